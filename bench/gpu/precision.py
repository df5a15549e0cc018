"""Clean accuracy of the served backbone in float32, bfloat16 and float16 (``backend.precision``).

    python bench/gpu/precision.py [--bundle bundles/default] [--device cpu|cuda] [--n 10000] \\
        [--batch 1024] [--out bench/results/gpu.precision.cpu]

Runs the bundle's test split through :class:`robustgate.proxy.backends.torch.TorchBackend` at each
precision (autocast; logits returned in float32) and reports, per precision: clean accuracy, the
share of predictions equal to float32's, the largest absolute logit difference to float32, and
images/s of the backbone alone (batches of ``--batch``, after one warm-up batch; on cuda timed
with a synchronize around the loop). The accuracy cost of a precision is its accuracy minus
float32's. Results: OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, command_line, machine, write  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "float16")


def run(backend, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """All of ``x`` ``[N, C, H, W]`` (host) through ``backend`` -> logits ``[N, K]`` (host), seconds."""
    backend.infer_tensor(x[:batch])  # warm-up: kernels chosen, autocast caches filled
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    xs = x.to(backend.device)
    sync()
    t0 = time.perf_counter()
    out = [backend.infer_tensor(xs[i:i + batch]) for i in range(0, len(xs), batch)]
    sync()
    seconds = time.perf_counter() - t0
    return torch.cat(out).cpu(), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=10000, help="test images (from the first)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.precision.cpu")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from robustgate.models.bundle import Bundle
    from robustgate.models.data import bundle_splits
    from robustgate.proxy.backends.torch import TorchBackend

    bundle = Bundle.load(args.bundle)
    x, y = bundle_splits(bundle).take("test", args.n)
    rows, ref = {}, None
    for precision in tqdm(PRECISIONS, desc="precisions"):
        backend = TorchBackend(bundle, device=args.device, precision=precision)
        logits, seconds = run(backend, x, args.batch)
        pred = logits.argmax(1)
        if ref is None:
            ref = logits
        rows[precision] = {
            "clean_accuracy": float((pred == y).float().mean()),
            "agreement_with_float32": float((pred == ref.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((logits - ref).abs().max()),
            "images_per_s": args.n / seconds,
        }
    base = rows["float32"]["clean_accuracy"]
    for r in rows.values():
        r["accuracy_cost"] = base - r["clean_accuracy"]
    result = {"bundle": bundle.name, "n": args.n, "batch": args.batch, "device": args.device,
              "command": command_line(), "machine": machine(args.device), "precisions": rows}
    lines = [f"# Backbone precision on {args.device}: clean accuracy float32 vs bfloat16 vs float16", "",
             f"`{result['command']}`  ", f"machine: {result['machine']}", "",
             f"Bundle `{bundle.name}`, {args.n} test images, batches of {args.batch}, "
             "`TorchBackend(precision=...)` (autocast; logits in float32).", "",
             "| precision | clean accuracy | cost vs float32 | same prediction as float32 | max abs logit diff | images/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['clean_accuracy']:.4f} | {r['accuracy_cost']:+.4f} | "
                     f"{r['agreement_with_float32']:.4f} | {r['max_abs_logit_diff']:.3g} | {r['images_per_s']:,.0f} |")
    write(args.out, result, "\n".join(lines) + "\n")
    print("\n".join(lines[-5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
