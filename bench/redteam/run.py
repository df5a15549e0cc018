"""Red-team benchmark (issue 4): the default bundle's evaluation matrix, timed.

    .venv/bin/python bench/redteam/run.py [--n 1000] [--n-autoattack 500] [--n-diffusion 1000] \
        [--threads 1] [--parallel 2] [--matrix bench/redteam/matrix.yaml] [--out reports/redteam]

Runs ``robustgate eval`` three times on ``bundles/default`` -- the matrix of configurations in
``matrix.yaml`` (no defense, each defense alone, the default pipeline) x the white-box,
adaptive and black-box attacks at n = ``--n``; AutoAttack (standard) at n = ``--n-autoattack``;
and the diffusion purifier (``diffusion.yaml``) under the same attacks at n = ``--n-diffusion``
(each of its forward passes costs two UNet evaluations, ~100x the backbone; its twin's sampler
is differentiated in ``--diffusion-twin-precision``, bfloat16 by default: ~2x faster here, see
docs/EVALUATION.md) -- and records for each run its wall time, the CPU seconds it used, the load
average before and after, and every cell's own wall time (the generation of its adversarial
examples, summed over their batches, plus their scoring). The target is that the whole matrix
completes in at most 2 hours on this 2-core machine; on a shared machine the wall time is an
upper bound and the CPU seconds say how much of it was this benchmark's. ``--parallel K`` runs
each invocation's batches of adversarial examples in K worker processes (``robustgate eval
--parallel``, attacks/parallel.py; one per core); the recorded generation and scoring time of
what an interrupted run had cached is then added as if it had run one thing after another (an
upper bound).

Results: bench/results/redteam.run.json and bench/results/redteam.run.md (the reports themselves stay in
``--out``: results.json/results.md/plots per run, cells cached so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TARGET_SECONDS = 2 * 3600


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cached_files(report_dir: Path) -> dict[str, int]:
    """The report's cached cells and batches of adversarial examples: path -> modification time (ns)."""
    files = [*(report_dir / "cells").glob("*.json"), *(report_dir / "adv").glob("*/*.safetensors")]
    return {str(f.relative_to(report_dir)): f.stat().st_mtime_ns for f in files}


def _recorded_seconds(report_dir: Path, name: str) -> float:
    """What a cached file's computation took: a cell's scoring, a batch's generation."""
    path = report_dir / name
    if path.suffix == ".safetensors":
        return float(load_file(str(path))["seconds"].item())
    return float(json.loads(path.read_text()).get("scoring_seconds", 0.0))


def timed_eval(argv: list[str], report_dir: Path) -> dict:
    """Runs ``robustgate eval ARGV`` to completion and measures it. Cells and batches an earlier,
    interrupted invocation left in ``report_dir`` are reused by the runner (its cache); their own
    recorded times are added, so that ``wall_seconds`` is what an uninterrupted run would have
    taken (``this_invocation_seconds`` is this one alone)."""
    cmd = [sys.executable, "-m", "robustgate.proxy.cli", "eval", *argv]
    before = _cached_files(report_dir)
    load_before = os.getloadavg()
    cpu0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    reused = [name for name, mtime in _cached_files(report_dir).items() if before.get(name) == mtime]
    reused_s = sum(_recorded_seconds(report_dir, name) for name in reused)
    return {
        "command": "robustgate eval " + " ".join(shlex.quote(a) for a in argv),
        "wall_seconds": round(wall + reused_s, 1),
        "this_invocation_seconds": round(wall, 1),
        "reused_files": len(reused),
        "reused_seconds": round(reused_s, 1),
        "cpu_seconds": round(_children_cpu() - cpu0, 1),  # this invocation's only
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }


def cell_rows(report_dir: Path) -> list[dict]:
    result = json.loads((report_dir / "results.json").read_text())
    return [
        {"config": c["config"], "attack": c["attack"], "eps": c["eps"], "status": c["status"],
         "robust_accuracy": (c.get("metrics") or {}).get("robust_accuracy"),
         "wall_seconds": round(c.get("wall_seconds", 0.0), 1),
         "generation_seconds": round((c.get("metrics") or {}).get("generation_seconds", 0.0), 1)}
        for c in result["cells"]
    ]


def markdown(summary: dict) -> str:
    lines = [
        "# Red-team benchmark: the default bundle's evaluation matrix",
        "",
        f"Command: `{summary['command']}` ({summary['created']}, {summary['machine']}).",
        "",
        f"**Total wall time {summary['total_wall_seconds'] / 60:.1f} min** (target <= 120 min: "
        f"**{'met' if summary['target_met'] else 'not met'}**), "
        f"CPU of these invocations {summary['total_cpu_seconds'] / 60:.1f} min.",
        "",
        "A run's wall s counts everything once: a run resumed after an interruption reuses the cells and "
        "batches of adversarial examples it had cached, and their recorded times are added to the resumed "
        "invocation's. A cell's wall s is the generation of its examples (summed over their batches, which "
        "the workers generate side by side; a backbone attack's examples are shared by every configuration "
        "and counted in each) plus their scoring on the served pipeline.",
        "",
        "| run | command | wall s | of which reused files (count, s) | CPU s (this invocation) | load before / after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in summary["runs"].items():
        lines.append(f"| {name} | `{run['command']}` | {run['wall_seconds']} | {run['reused_files']}, "
                     f"{run['reused_seconds']} | {run['cpu_seconds']} | "
                     f"{run['load_before'][0]} / {run['load_after'][0]} |")
    for name, run in summary["runs"].items():
        lines += ["", f"## {name}: cells", "",
                  "| config | attack | eps | status | robust acc | wall s | of which generation s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in run["cells"]:
            acc = "" if c["robust_accuracy"] is None else f"{c['robust_accuracy']:.3f}"
            lines.append(f"| {c['config']} | {c['attack']} | {c['eps']} | {c['status']} | {acc} | {c['wall_seconds']} "
                         f"| {c['generation_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="bundles/default")
    p.add_argument("--matrix", default="bench/redteam/matrix.yaml")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--n-autoattack", type=int, default=500)
    p.add_argument("--n-diffusion", type=int, default=1000, help="items of the diffusion run (0: skip it)")
    p.add_argument("--diffusion-matrix", default="bench/redteam/diffusion.yaml")
    p.add_argument("--diffusion-eot", type=int, default=4)
    p.add_argument("--diffusion-twin-precision", choices=["float32", "bfloat16"], default="bfloat16",
                   help="robustgate eval --twin-precision of the diffusion run")
    p.add_argument("--attacks", default="fgsm,pgd,bpda,eot,joint,square")
    p.add_argument("--eps", default="0.1,0.3")
    p.add_argument("--eot", type=int, default=8)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1, help="worker processes per eval run (robustgate eval --parallel)")
    p.add_argument("--out", default="reports/redteam")
    p.add_argument("--results", default="bench/results/redteam.run")
    args = p.parse_args()

    out = Path(args.out)
    par = ["--parallel", str(args.parallel)] if args.parallel > 1 else []
    common = ["--bundle", args.bundle, "--pipeline", args.matrix, "--threads", str(args.threads), *par, "--no-progress"]
    plan = {
        "matrix": [*common, "--each-alone", "--attacks", args.attacks, "--eps", args.eps, "--n", str(args.n),
                   "--steps", "20", "--eot", str(args.eot), "--queries", str(args.queries),
                   "--out", str(out / "matrix")],
        "autoattack": [*common, "--attacks", "autoattack", "--eps", "0.1", "--n", str(args.n_autoattack),
                       "--out", str(out / "autoattack")],
    }
    if args.n_diffusion:
        plan["diffusion"] = ["--bundle", args.bundle, "--pipeline", args.diffusion_matrix, "--threads", str(args.threads),
                             *par, "--no-progress", "--attacks", args.attacks, "--eps", args.eps, "--n", str(args.n_diffusion),
                             "--steps", "20", "--eot", str(args.diffusion_eot), "--queries", str(args.queries),
                             "--twin-precision", args.diffusion_twin_precision, "--out", str(out / "diffusion")]
    runs = {}
    for name, argv in plan.items():
        report_dir = ROOT / argv[argv.index("--out") + 1]
        runs[name] = timed_eval(argv, report_dir)
        runs[name]["cells"] = cell_rows(report_dir)
    total_wall = sum(r["wall_seconds"] for r in runs.values())
    summary = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/redteam/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores",
        "runs": runs,
        "total_wall_seconds": round(total_wall, 1),
        "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in runs.values()), 1),
        "target_seconds": TARGET_SECONDS,
        "target_met": total_wall <= TARGET_SECONDS,
    }
    results = ROOT / args.results
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_name(results.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    results.with_name(results.name + ".md").write_text(markdown(summary))
    print(f"total {total_wall / 60:.1f} min (target 120): wrote {results}.json and {results}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
