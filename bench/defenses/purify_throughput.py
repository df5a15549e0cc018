"""Purifier and ensemble-expansion throughput (images/s at batch 64) on Fashion-MNIST test images.

For each stage kind the benchmark times ``purify`` (purifiers) or ``expand`` (ensembles; the
classifier's extra work for the ``T`` copies is what costs, reported as copies per item) on the
same batch, next to the forward pass of the default ``cnn`` backbone (untrained: speed does not
depend on the weights) as the reference for "a cheap purifier costs at most 10% of throughput":
``overhead = t_stage / t_backbone``. Median over ``--repeats`` timed runs after one warm-up.

    .venv/bin/python bench/defenses/purify_throughput.py --threads 2 \
        [--diffusion-artifacts /work/diffrun/model] --out bench/results/defenses.purify_throughput

The machine's 2 cores are shared with other engineers' jobs: the load average at start and end
is recorded; under contention two torch threads can be several times slower than one, so the
figures are lower bounds for a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from robustgate.defenses.base import Ensemble, build
from robustgate.models.archs import build_arch
from robustgate.models.data import load_splits

STAGES: list[tuple[str, dict[str, Any]]] = [
    ("jpeg", {"quality": 75}),
    ("noise", {"sigma": 0.1}),
    ("bitdepth", {"bits": 4}),
    ("median", {"kernel_size": 3}),
    ("diffusion", {}),  # defaults: t* = 100, k = 2 DDIM steps
    ("diffusion", {"steps": 1}),
    ("tte", {}),
    ("smoothing", {}),
]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--diffusion-artifacts", type=Path, default=None,
                    help="directory with diffusion_unet.safetensors/.json (speed is the same untrained)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/defenses.purify_throughput"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = load_splits("fashion-mnist", seed=0).test_x[: args.batch].contiguous()  # [B, 1, 28, 28]
    backbone = build_arch("cnn").eval()
    load_start = os.getloadavg()
    with torch.no_grad():
        t_backbone = timed(lambda: backbone(x), args.repeats)
        rows: list[dict[str, Any]] = [{"stage": "backbone cnn (reference)", "kind": "backbone", "params": {},
                                       "seconds_per_batch": t_backbone, "images_per_s": args.batch / t_backbone}]
        for kind, params in STAGES:
            d = build(kind, **params)
            if kind == "diffusion" and args.diffusion_artifacts is not None:
                d.load_artifacts({"weights": args.diffusion_artifacts / "diffusion_unet.safetensors",
                                  "config": args.diffusion_artifacts / "diffusion_unet.json"})
            g = torch.Generator().manual_seed(0)
            if isinstance(d, Ensemble):
                t = timed(lambda: d.expand(x, g), args.repeats)
                copies = d.copies
                # what the ensemble makes the classifier do: T copies per item
                t_total = t + copies * t_backbone
            else:
                t = timed(lambda: d.purify(x, g), args.repeats)
                copies = 1
                t_total = t + t_backbone
            rows.append({
                "stage": f"{kind} {json.dumps(params, sort_keys=True)}", "kind": kind, "params": d.config(),
                "seconds_per_batch": t, "images_per_s": args.batch / t, "copies_per_item": copies,
                "overhead_vs_backbone": t / t_backbone,
                "pipeline_images_per_s_est": args.batch / t_total,
            })
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "diffusion_artifacts": str(args.diffusion_artifacts) if args.diffusion_artifacts else None,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Purifier / ensemble throughput", "",
        f"`{result['command']}` at {result['time_utc']}: batch {args.batch}, torch threads {args.threads}, "
        f"median of {args.repeats} runs; load average {load_start[0]:.1f} at start, "
        f"{result['loadavg_end'][0]:.1f} at end (2 cores shared with other jobs: figures are lower bounds).", "",
        "`overhead` = stage time / backbone forward time (the 10% target for cheap purifiers is overhead <= 0.1);",
        "`pipeline est.` = batch / (stage + copies x backbone) in-process, without the proxy's transport.", "",
        "| stage | images/s | overhead vs backbone | copies/item | pipeline est. images/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['images_per_s']:.0f} | {r.get('overhead_vs_backbone', 1.0):.2f} | "
                     f"{r.get('copies_per_item', 1)} | {r.get('pipeline_images_per_s_est', r['images_per_s']):.0f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
