"""What MagNet's autoencoders cost on their own: ONNX Runtime time per image at batch 64, one
intra-op thread, for autoencoders I, II and III at given widths (random weights: the cost does not
depend on them) and, for scale, the bundle's backbone.

    .venv/bin/python bench/detect/ae_cost.py --widths 8 16 --out bench/results/detect.ae_cost

Writes OUT.json and OUT.md (median of --repeats timings of --iters runs each).
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from robustgate.defenses.detect.magnet import ARCHS, autoencoder
from robustgate.models.bundle import Bundle

REPO = Path(__file__).resolve().parents[2]


def session(model: bytes | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the MagNet stage runs it (onnx_threads 1)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def us_per_image(sess: ort.InferenceSession, batch: int, iters: int, repeats: int) -> float:
    x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, feed)
        times.append((time.perf_counter() - t0) / iters / batch * 1e6)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "detect.ae_cost")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    bundle = Bundle.load(args.bundle)
    rows.append({"model": f"backbone of {args.bundle.name}",
                 "us_per_image": us_per_image(session(str(bundle.path(bundle.spec.backbone.onnx))), args.batch,
                                              args.iters, args.repeats)})
    for arch in ARCHS:
        for width in args.widths:
            buf = io.BytesIO()
            torch.onnx.export(autoencoder(arch, 1, width, "relu").eval(), (torch.rand(2, 1, 28, 28),), buf,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                              dynamo=False)
            rows.append({"model": f"autoencoder {arch}, width {width}",
                         "us_per_image": us_per_image(session(buf.getvalue()), args.batch, args.iters, args.repeats)})
    command = "python bench/detect/ae_cost.py " + " ".join(shlex.quote(v) for v in sys.argv[1:])
    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "batch": args.batch, "threads": 1, "rows": rows}
    md = [f"# MagNet autoencoder cost in ONNX Runtime (batch {args.batch}, 1 thread)", "",
          f"Command: `{command}` ({result['created']}). Median of {args.repeats} timings of {args.iters} runs.", "",
          "| model | µs per image |", "| --- | ---: |"]
    md += [f"| {r['model']} | {r['us_per_image']:.1f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_name(args.out.name + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
