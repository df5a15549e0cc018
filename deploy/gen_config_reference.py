"""Generates the configuration reference of docs/OPERATIONS.md from the proxy's config schema.

Types, defaults, allowed values and bounds come from the pydantic model's JSON schema
(``robustgate.proxy.config.ProxyConfig.model_json_schema()``); each key's note is its
``Field(description=...)`` when set, else the comment on the field's line in proxy/config.py.
The section between the markers in docs/OPERATIONS.md is rewritten in place; a test fails when
it is stale:

    .venv/bin/python deploy/gen_config_reference.py          # rewrite docs/OPERATIONS.md
    .venv/bin/python deploy/gen_config_reference.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from robustgate.proxy import config as config_module
from robustgate.proxy.config import ENV_PREFIX, ProxyConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
BEGIN = "<!-- BEGIN GENERATED: config reference (deploy/gen_config_reference.py) -->"
END = "<!-- END GENERATED: config reference -->"


def field_notes(model: type[BaseModel]) -> dict[str, str]:
    """field -> note: its description, else the trailing comment on its line in the source."""
    notes = {}
    source = inspect.getsource(model)
    for name, info in model.model_fields.items():
        if info.description:
            notes[name] = info.description
            continue
        m = re.search(rf"^\s+{re.escape(name)}\s*:[^\n]*#\s*(.+)$", source, re.M)
        if m:
            notes[name] = m.group(1).strip()
    return notes


def models_by_title() -> dict[str, type[BaseModel]]:
    return {
        obj.__name__: obj for obj in vars(config_module).values()
        # the config's own models and those it imports (the pipeline section: defenses/assemble.py)
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__.startswith("robustgate.")
    }


def type_of(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        kinds = [type_of(p) for p in prop["anyOf"]]
        return " or ".join(k for k in kinds if k != "null") + (" or null" if "null" in kinds else "")
    if "$ref" in prop:
        return "section"
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {type_of(prop.get('items', {}))}"
    if kind == "string" and prop.get("format") == "path":
        return "path"
    return kind


def bounds(prop: dict[str, Any]) -> str:
    parts = []
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in prop:
            parts.append(f"{sym} {prop[key]}")
    if "pattern" in prop:
        parts.append(f"matches `{prop['pattern']}`")
    for alt in prop.get("anyOf", []):
        b = bounds(alt)
        if b:
            parts.append(b)
    return ", ".join(parts)


def default_of(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop or isinstance(prop["default"], dict):
        return ""
    return f"`{json.dumps(prop['default'])}`"


def sections(schema: dict[str, Any]) -> list[tuple[str, str, list[list[str]]]]:
    """[(dotted section, model name, rows)], depth first in declaration order."""
    defs = schema["$defs"]
    models = models_by_title()
    out: list[tuple[str, str, list[list[str]]]] = []

    def walk(title: str, node: dict[str, Any], prefix: str, env_ok: bool) -> None:
        notes = field_notes(models[title])
        rows, children = [], []
        for name, prop in node["properties"].items():
            key = f"{prefix}{name}"
            ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
            env = f"`{ENV_PREFIX}{key.replace('.', '__').upper()}`" if env_ok and "[]" not in key else ""
            if ref:
                child = ref.rsplit("/", 1)[1]
                is_list = prop.get("type") == "array"
                children.append((child, f"{key}[]." if is_list else f"{key}.", env_ok and not is_list))
                kind = f"list of `{child}`" if is_list else f"section `{child}`"
                rows.append([f"`{key}`", kind, default_of(prop, name in node.get("required", [])) if is_list else "",
                             env if is_list else "", notes.get(name, "")])
                continue
            rows.append([f"`{key}`", type_of(prop), default_of(prop, name in node.get("required", [])), env,
                         "; ".join(x for x in (notes.get(name, ""), bounds(prop)) if x)])
        out.append((prefix.rstrip(".") or "(top level)", title, rows))
        for child, child_prefix, child_env in children:
            walk(child, defs[child], child_prefix, child_env)

    walk(schema["title"], schema, "", True)
    return out


def render() -> str:
    schema = ProxyConfig.model_json_schema()
    lines = [
        BEGIN,
        "",
        "Generated from `robustgate.proxy.config.ProxyConfig` (its JSON schema and field comments).",
        "Every key can also be set by the environment variable in its row; the value is parsed as a YAML",
        "scalar or flow value (`32`, `true`, `[a, b]`). Precedence: defaults < YAML file < environment <",
        "command-line flags (`--bundle`, `--port`, `--metrics-port`, `--host`). Unknown keys are errors.",
        "",
    ]
    for section, model, rows in sections(schema):
        heading = "Top level" if section == "(top level)" else f"`{section}`"
        lines += [f"#### {heading} ({model})", "", "| key | type | default | environment | notes |", "| --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") if "\\|" not in cell else cell for cell in row) + " |"
                  for row in rows]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def updated(doc: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/OPERATIONS.md is stale")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    fresh = updated(current)
    if args.check:
        if fresh != current:
            print(f"{DOC} is stale: run .venv/bin/python deploy/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
