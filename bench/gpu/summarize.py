"""Collects the parts of bench/gpu/check.sh into one JSON and one Markdown file.

    python bench/gpu/summarize.py WORK_DIR OUT_PREFIX

``WORK_DIR`` holds ``parts.jsonl`` (one line per part from check.sh: name, rc, seconds, limit,
skipped), ``parts/NAME.log`` and the parts' result files (``res/NAME.json``, ``eval_*/results.json``).
Writes ``OUT_PREFIX``.json (every part's status and its full result) and ``OUT_PREFIX``.md (the
figures against the targets of issue 24, then each part's Markdown).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"default_items_per_s": 50000, "default_half_load_p99_ms": 10.0, "diffusion_items_per_s": 20000,
           "matrix_minutes": 15.0}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _eval_summary(results: dict | None) -> dict | None:
    if not results:
        return None
    cells = [{"config": c["config"], "attack": c["attack"], "n": c["n"], "status": c["status"],
              "robust_accuracy": c.get("metrics", {}).get("robust_accuracy"),
              "wall_seconds": c.get("wall_seconds")} for c in results.get("cells", [])]
    return {"n": results.get("n"), "command": results.get("command"), "cells": cells,
            "cells_wall_seconds": sum(c["wall_seconds"] or 0 for c in cells)}


def main(work: Path, prefix: Path) -> int:
    parts = [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines() if line.strip()]
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine  # noqa: E402  (bench/ is not a package)

    device = os.environ.get("CHECK_DEVICE", "cuda")
    out = {"command": os.environ.get("CHECK_COMMAND", "bash bench/gpu/check.sh"),
           "started_utc": os.environ.get("CHECK_STARTED_UTC", "not recorded"), "machine": machine(device),
           "parts": {}}
    for p in parts:
        name = p["name"]
        entry = dict(p)
        entry["timed_out"] = p["rc"] in (124, 137)
        entry["ok"] = p["rc"] == 0 and not p.get("skipped")
        if name.startswith("eval"):
            entry["result"] = _eval_summary(_read_json(work / name / "results.json"))
        else:
            entry["result"] = _read_json(work / "res" / f"{name}.json")
        entry["log_tail"] = _tail(work / "parts" / f"{name}.log")
        out["parts"][name] = entry
    info = _tail(work / "parts" / "info.log", 60)
    out["info"] = info

    def get(name, *keys):
        node = out["parts"].get(name, {}).get("result")
        for k in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(k)
        return node

    figures = {
        "default_items_per_s": get("serve_default", "max_items_per_s"),
        "default_half_load_p99_ms": get("serve_default", "half_load_open_loop", "p99_ms"),
        "diffusion_items_per_s": get("serve_diffusion", "max_items_per_s"),
        "diffusion_half_load_p99_ms": get("serve_diffusion", "half_load_open_loop", "p99_ms"),
        "eval_pgd_seconds": out["parts"].get("eval_pgd", {}).get("seconds"),
        "eval_autoattack_seconds": out["parts"].get("eval_autoattack", {}).get("seconds"),
        "eval_autoattack_n": get("eval_autoattack", "n"),
        "train_one_epoch_seconds": out["parts"].get("train", {}).get("seconds"),
    }
    workers = get("serving_workers", "rows") or []
    if workers:  # issue 25 on this machine's cores: the best batch-1 items/s at the highest concurrency
        c = max(r["concurrency"] for r in workers)
        best = max((r for r in workers if r["concurrency"] == c), key=lambda r: r["items_per_s"])
        figures.update(serving_workers_best_items_per_s=best["items_per_s"],
                       serving_workers_best_workers=best["workers"],
                       serving_workers_pct_of_ceiling=100 * best["of_ceiling"])
    if figures["eval_autoattack_seconds"] and figures["eval_autoattack_n"]:
        # an extrapolation, labelled as such: AutoAttack's cost is linear in the images attacked
        figures["eval_autoattack_10k_minutes_extrapolated"] = figures["eval_autoattack_seconds"] * 10000 / figures[
            "eval_autoattack_n"] / 60
    out["figures"], out["targets"] = figures, TARGETS
    prefix.parent.mkdir(parents=True, exist_ok=True)
    (prefix.parent / (prefix.name + ".json")).write_text(json.dumps(out, indent=2, default=str) + "\n")

    md = ["# bench/gpu/check.sh", "", "```", info, "```", "", "## Parts", "",
          "| part | ok | rc | seconds | limit s |", "| --- | --- | --- | --- | --- |"]
    for name, e in out["parts"].items():
        md.append(f"| {name} | {'yes' if e['ok'] else ('skipped' if e.get('skipped') else 'NO')} | {e['rc']} | "
                  f"{e['seconds']} | {e['limit']} |")
    heading = "## Figures against issue 24's targets (and issue 25's, serving_workers)"
    md += ["", heading, "", "| figure | value | target |", "| --- | --- | --- |"]
    fmt = lambda v: "—" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    target_of = {"default_items_per_s": "≥ 50,000", "default_half_load_p99_ms": "≤ 10",
                 "diffusion_items_per_s": "≥ 20,000", "eval_autoattack_10k_minutes_extrapolated": "matrix ≤ 15 min",
                 "serving_workers_pct_of_ceiling": "≥ 40 (issue 25)"}
    for k, v in figures.items():
        md.append(f"| {k} | {fmt(v)} | {target_of.get(k, '')} |")
    for name, e in out["parts"].items():
        md += ["", f"## {name}", ""]
        res_md = (work / name / "results.md") if name.startswith("eval") else (work / "res" / f"{name}.md")
        if res_md.is_file():
            md.append(res_md.read_text())
        md += ["Log tail:", "", "```", e["log_tail"], "```"]
    (prefix.parent / (prefix.name + ".md")).write_text("\n".join(md) + "\n")
    print("\n".join(md[md.index("## Parts"): md.index(heading) + 4 + len(figures)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
