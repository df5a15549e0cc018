"""docs/OPERATIONS.md's configuration reference is generated from proxy/config.py and current."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel

from robustgate.proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "deploy" / "gen_config_reference.py"
DOC = ROOT / "docs" / "OPERATIONS.md"


def generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys of every setting, from the pydantic model itself (not its JSON schema)."""
    keys = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= leaf_keys(ann, f"{prefix}{name}.")
        elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):  # list[Model]
            keys |= leaf_keys(args[0], f"{prefix}{name}[].")
        else:
            keys.add(prefix + name)
    return keys


def documented_keys() -> dict[str, str]:
    block = DOC.read_text().split(generator().BEGIN, 1)[1].split(generator().END, 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", block, re.M)}


def test_reference_is_current():
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_check_detects_a_stale_reference(tmp_path):
    gen = generator()
    doc = DOC.read_text()
    stale = re.sub(r"^\| `server.port` \|.*\n", "", doc, flags=re.M)
    assert stale != doc
    assert gen.updated(stale) == doc


def test_every_setting_is_documented_with_its_environment_variable():
    rows = documented_keys()
    for key in leaf_keys(ProxyConfig):
        assert key in rows, f"{key} missing from the configuration reference"
        if "[]" not in key:
            assert f"`ROBUSTGATE_{key.replace('.', '__').upper()}`" in rows[key]


def test_defaults_in_the_reference_are_the_models():
    rows = documented_keys()
    defaults = ProxyConfig().model_dump(mode="json")
    for key in ("server.port", "server.metrics_port", "batching.max_batch_size", "pipeline.failure_policy",
                "backend.upstream.url"):
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert rows[key].split(" | ")[2] == f"`{json.dumps(value)}`", rows[key]


def test_shipped_k8s_config_uses_only_documented_keys():
    rows = documented_keys()

    def walk(node, prefix=""):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k != "params":
                yield from walk(v, key + ".")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    yield from walk(item, key + "[].")
            else:
                yield key

    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "robustgate.yaml").read_text())
    for key in walk(config):
        assert key in rows, key
