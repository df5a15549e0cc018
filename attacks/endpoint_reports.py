"""Reports of an endpoint red-team run: results.json and results.md, the threat model in every row.

The JSON is the result of :func:`~robustgate.attacks.endpoint_redteam.run_endpoint_matrix`:
``cells`` (one per attack and query budget, each with its ``threat_model`` -- norm, eps, budget,
attack, adaptation, identities -- its ``metrics`` and per-image ``items``) and ``benign`` (one
entry per benign stream).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ENDPOINT_SCHEMA = 1


def _f(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# robustgate eval --threat endpoint: {result['model']} at {result['url']}", "",
             f"{result['n']} attacked images. Command: `{result['command']}`.", "",
             "Success: an accepted answer with a wrong label for a query within ε (l∞) of the clean image. "
             "Detection: a rejection by a detection stage ("
             + ", ".join(f"`{s}`" for s in result["settings"]["detection_stages"]) + ") or a block.", "",
             "## Attacks", "",
             "| attack | threat model | robust accuracy | detected | completed before detection | "
             "median queries to detection | median queries to success | attack queries |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["cells"]:
        if c["status"] != "done":
            lines.append(f"| {c['attack']} | budget {c['budget']} | skipped ({c['reason']}) | | | | | |")
            continue
        t, m = c["threat_model"], c["metrics"]
        desc = (f"{t['norm']} ε={t['eps']:g}, {t['queries']} queries/image, sees {t['answers_seen']}, "
                f"{t['adaptation']}, {t['identities']} identit{'y' if t['identities'] == 1 else 'ies'}, n {t['n']}")
        if "hsj_evals" in t:
            desc += f", gradient estimate {t['hsj_evals']['init_eval']}·√t ≤ {t['hsj_evals']['max_eval']} queries"
        lines.append(f"| {c['attack']} | {desc} | {_f(m['robust_accuracy'])} | {_f(m['detected_share'])} | "
                     f"{_f(m['completed_before_detection_share'])} | {_f(m['queries_to_first_detection_median'])} | "
                     f"{_f(m['queries_to_success_median'])} | {m['attack_queries']} |")
    if result.get("benign"):
        lines += ["", "## Benign streams", "",
                  "| stream | queries | clients | refused (any stage) | detected | clients ever blocked | "
                  "clients ever detected |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, b in result["benign"].items():
            lines.append(f"| {name} | {b['queries']} | {b['clients']} | {_f(b['refused_share'])} | "
                         f"{_f(b['detected_share'])} | {_f(b['clients_ever_blocked_share'])} | "
                         f"{_f(b['clients_ever_detected_share'])} |")
    lines += ["", "## Wall time per cell (s)", "", "| attack | budget | seconds |", "| --- | --- | --- |"]
    lines += [f"| {c['attack']} | {c['budget']} | {c['wall_seconds']:.1f} |"
              for c in result["cells"] if c["status"] == "done"]
    return "\n".join(lines) + "\n"


def write_endpoint_reports(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["schema_version"] = ENDPOINT_SCHEMA
    result.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    return {"json": out / "results.json", "md": out / "results.md"}
