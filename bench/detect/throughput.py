"""Cost of detection at batch 64 in ONNX Runtime (what the proxy runs): backbone alone vs
backbone + each detector's online part, images per second, median of repeated timed runs.

    .venv/bin/python bench/detect/throughput.py --bundle bundles/default --stages magnet_l1

Issue 5 target: detection adds at most 25% to the per-image cost at batch 64. ``threads`` ONNX
Runtime intra-op threads (1 by default: the machine is shared; the ratio is what matters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from robustgate.defenses.base import build
from robustgate.defenses.runtime import OnnxModel
from robustgate.models.bundle import Bundle


class _OrtClassifier:
    """The bundle's ONNX backbone as a Classifier (logits and features outputs), like the proxy's."""

    def __init__(self, bundle: Bundle, threads: int):
        spec = bundle.spec.backbone
        self.logits_model = OnnxModel(bundle.path(spec.onnx), output=spec.logits_output, threads=threads)
        self.features_model = OnnxModel(bundle.path(spec.onnx), output=spec.features_output, threads=threads) \
            if spec.features_output else None

    def logits(self, x):
        return self.logits_model(x)

    def features(self, x):
        return self.features_model(x)


def _time_pair(base, extra, reps: int) -> tuple[float, float]:
    """Median seconds of ``base()`` and ``extra()``, timed alternately so that the machine's load
    drift (shared cores) hits both alike."""
    base(), extra()  # warm-up
    tb, te = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        extra()
        t2 = time.perf_counter()
        tb.append(t1 - t0)
        te.append(t2 - t1)
    return statistics.median(tb), statistics.median(te)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--stages", nargs="+", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    clf = _OrtClassifier(bundle, args.threads)
    x = torch.rand(args.batch, *bundle.input.shape, generator=torch.Generator().manual_seed(0))
    out = {"batch": args.batch, "threads": args.threads, "reps": args.reps, "stages": {}}
    for name in args.stages:
        spec = bundle.defense(name)
        det = build(spec.kind, **{**spec.params, "runtime": "onnx"})
        det.load_artifacts({r: bundle.path(a) for r, a in spec.files.items()})
        base, t = _time_pair(lambda: clf.logits(x), lambda: det.score(x, clf), args.reps)
        out["stages"][name] = {"backbone_seconds": base, "backbone_images_per_s": args.batch / base,
                               "detector_seconds": t, "added_fraction": t / base}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
