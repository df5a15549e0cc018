"""Pools the per-round added costs of several bench/detect/proxy_cost.py runs of one variant.

One run's median moves with the shared machine's drift (+19% to +26% for the same code); the
rounds of all runs together give a steadier figure:

    .venv/bin/python bench/detect/pool_cost.py --variant magnet_l1 \\
        bench/results/detect.proxy_cost_fused.json bench/results/detect.proxy_cost_fused_b.json \\
        bench/results/detect.proxy_cost.json --out bench/results/detect.pool_cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="proxy_cost.py result JSON files")
    p.add_argument("--variant", required=True)
    p.add_argument("--target", type=float, default=0.25, help="added-cost target (issue 5: 0.25)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    runs = []
    for path in args.runs:
        r = json.loads(path.read_text())
        if args.variant not in r.get("variants", {}):
            p.error(f"{path}: no variant {args.variant!r} (has: {', '.join(r.get('variants', {})) or 'none'})")
        v = r["variants"][args.variant]
        runs.append({"file": str(path), "command": r["command"], "started": r["started"], "revision": r["revision"],
                     "rounds": v["added_cost_per_round"], "median": v["added_cost_median"]})
    pooled = [x for run in runs for x in run["rounds"]]
    result = {"command": " ".join(["python", *sys.argv]), "variant": args.variant, "target": args.target, "runs": runs,
              "pooled": {"rounds": len(pooled), "median": statistics.median(pooled), "mean": statistics.mean(pooled),
                         "rounds_within_target": sum(x <= args.target for x in pooled)}}
    pct = lambda x: f"{x * 100:+.1f}%"  # noqa: E731
    lines = [f"# Detection cost pooled over runs: {args.variant}", "",
             "Written by `bench/detect/pool_cost.py` (do not edit by hand; rerun it).", "",
             f"- Command: `{result['command']}`", "",
             "| run | started | revision | median of its rounds | rounds |", "| --- | --- | --- | ---: | --- |"]
    for run in runs:
        lines.append(f"| `{run['file']}` | {run['started']} | {run['revision']} | {pct(run['median'])} | "
                     + ", ".join(pct(x) for x in run["rounds"]) + " |")
    q = result["pooled"]
    lines += ["", f"**Pooled over {q['rounds']} rounds: median {pct(q['median'])}, mean {pct(q['mean'])}; "
              f"{q['rounds_within_target']} of {q['rounds']} rounds within the {pct(args.target)} target.**", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(result, indent=1))
    args.out.with_name(args.out.name + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
