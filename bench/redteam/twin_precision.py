"""Speed of the attacked diffusion twin in float32 and bfloat16 (``robustgate eval --twin-precision``).

    .venv/bin/python bench/redteam/twin_precision.py [--bundle bundles/default] [--batch 250] \\
        [--rounds 5] [--threads 1] [--out bench/results/redteam.twin_precision]

Times what one step of an attack on the diffusion purifier costs: the pipeline twin's forward
(both DDIM steps of the bundle's UNet, then the backbone) and the backward pass to the input, at the
eval's batch, one torch thread (a ``--parallel`` worker's). Both precisions run the same inputs
and noise; the first call of each is a warm-up. Also reports how far the bfloat16 gradient is from
the float32 one (cosine, share of equal signs: l-inf PGD steps along the sign). Whether the attack
is as strong is measured on attacks, not here: docs/results/diffusion-twin-precision/README.md.
Results: OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def step(twin, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One attack step's forward and backward; -> (seconds, input gradient)."""
    twin.generator = torch.Generator().manual_seed(0)  # the same diffusion noise for every call
    xg = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    loss = F.cross_entropy(twin(xg), y)
    (g,) = torch.autograd.grad(loss, xg)
    return time.perf_counter() - t0, g


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="bundles/default")
    p.add_argument("--stage", default="diffusion", help="the bundle's fitted diffusion defense")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/redteam.twin_precision")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from robustgate.attacks.differentiable import PipelineTwin
    from robustgate.defenses.assemble import PipelineConfig, build_stages
    from robustgate.models.bundle import Bundle
    from robustgate.models.data import bundle_splits
    from robustgate.models.twin import load_backbone

    bundle = Bundle.load(ROOT / args.bundle)
    stages = build_stages(PipelineConfig(stages=[{"name": args.stage, "kind": "diffusion"}]), bundle, twin=True)
    backbone = load_backbone(bundle, device="cpu")
    splits = bundle_splits(bundle)
    x, y = splits.take("test", args.batch)
    rows, grads = {}, {}
    for name, precision in (("float32", None), ("bfloat16", torch.bfloat16)):
        twin = PipelineTwin(backbone, stages, precision=precision)
        step(twin, x, y)  # warm-up (oneDNN picks its kernels)
        times = []
        for _ in range(args.rounds):
            seconds, grads[name] = step(twin, x, y)
            times.append(seconds)
        rows[name] = {"seconds_per_step": times, "median_s": statistics.median(times),
                      "ms_per_image": 1000 * statistics.median(times) / args.batch}
    g32, g16 = grads["float32"].flatten(), grads["bfloat16"].flatten()
    result = {
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip(),
        "machine": f"{os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.2f}",
        "batch": args.batch, "threads": args.threads, "precisions": rows,
        "speedup": rows["float32"]["median_s"] / rows["bfloat16"]["median_s"],
        "gradient": {"cosine": float(F.cosine_similarity(g32, g16, dim=0)),
                     "equal_sign_share": float((g32.sign() == g16.sign()).float().mean())},
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The attacked diffusion twin: float32 vs bfloat16", "",
             f"Command: `{result['command']}` ({result['started']}, revision {result['revision']}, {result['machine']}).",
             "", f"One attack step (twin forward through the DDIM steps and the backbone, backward to the input) at "
             f"batch {args.batch}, {args.threads} torch thread(s), median of {args.rounds}:", "",
             "| twin precision | s per step | ms per image |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['median_s']:.2f} | {r['ms_per_image']:.1f} |" for name, r in rows.items()]
    lines += ["", f"**bfloat16 is {result['speedup']:.2f}x as fast.** Gradient vs float32: cosine "
              f"{result['gradient']['cosine']:.4f}, equal sign {100 * result['gradient']['equal_sign_share']:.1f}% "
              "of pixels.", ""]
    out.with_name(out.name + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
