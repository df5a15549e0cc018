"""What a MagNet detector costs next to a ResNet-50 forward at 3x224x224, measured in isolation
(issue 21: the detector stage must cost <= 10% of the proxy's throughput there).

For each autoencoder (random weights: the cost does not depend on them) the MagNet stage's work on
one batch -- ``||x - AE(x)||_1`` per item -- is timed as the proxy runs it: in torch on one thread
(``runtime: torch``, the default; ``robustgate serve`` pins torch to one thread) and in ONNX Runtime
(``runtime: onnx``, the score graph, one intra-op thread, no spinning: ``onnx_threads: 1``); the
reference is torchvision's ResNet-50 exported to ONNX in ONNX Runtime with ``--threads`` intra-op
threads. ``share`` is the detector's time over the backbone's: the throughput it costs when the two
run one after the other is ``share / (1 + share)``.

    nice -n 10 python bench/byo/magnet_cost.py [--batch 16] [--threads 2] [--repeats 5]

Writes bench/results/byo.magnet_cost.json + .md (--repeats rounds after 2 warm-up runs, the backbone and
the detector timed in each round; a share is the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from robustgate.defenses.detect.magnet import autoencoder, reconstruction_error, reconstruction_error_graph, \
    resolve_arch, resolve_downsample

REPO = Path(__file__).resolve().parents[2]


def machine() -> dict:
    """bench/serving/run.py's machine description (CPU, cores, versions, revision)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robustgate_bench_serving_run", REPO / "bench" / "serving" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.machine()
SHAPE = (3, 224, 224)
# (label, arch, width): the detector's former default at 224x224 (II), the strided III, and IV,
# the auto choice at 224x224, at the default width (widened to the 48 folded channels) and at 64
CANDIDATES = [("II w32 (former default at 224)", "II", 32), ("III w16", "III", 16), ("III w32", "III", 32),
              ("IV w32 (auto at 224: 48 filters)", "auto", 32), ("IV w64", "IV", 64)]


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def onnx_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.rand(2, *SHAPE),), buf, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def session(model: bytes, threads: int, spinning: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def once_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Each of ``fns`` timed once per round, ``repeats`` rounds after 2 warm-up calls each: on a
    shared machine the load drifts, and a share computed within a round compares like with like."""
    for fn in fns.values():
        fn(), fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(once_ms(fn))
    return out


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="the backbone session's intra-op threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "byo.magnet_cost")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = loadavg()
    torch.set_num_threads(1)  # as robustgate serve runs the torch stages (defenses/assemble.py pin_torch_threads)
    x = np.random.default_rng(0).random((args.batch, *SHAPE), dtype=np.float32)  # [B, 3, 224, 224]
    xt = torch.from_numpy(x)
    torch.manual_seed(0)
    backbone = session(onnx_bytes(torchvision.models.resnet50(weights=None)), args.threads, spinning=True)
    run_backbone = lambda: backbone.run(None, {"input": x})  # noqa: E731
    rows, refs = [], []
    for label, arch, width in CANDIDATES:
        resolved = resolve_arch(arch, SHAPE)
        stages = resolve_downsample(resolved, "auto", SHAPE)
        ae = autoencoder(resolved, SHAPE[0], width, "relu", stages).eval()
        graph = reconstruction_error_graph(onnx.load_from_string(onnx_bytes(ae)), 1).SerializeToString()
        sess = session(graph, 1, spinning=False)

        def torch_score():
            with torch.no_grad():
                reconstruction_error(xt, ae(xt), 1)

        t = interleaved({"backbone": run_backbone, "torch": torch_score,
                         "onnx": lambda: sess.run(None, {"input": x})}, args.repeats)
        refs += t["backbone"]
        params = sum(w.numel() for w in ae.parameters())
        rows.append({"autoencoder": label, "arch": resolved, "downsample": stages, "params": params,
                     "torch_1_thread_ms": statistics.median(t["torch"]), "onnx_1_thread_ms": statistics.median(t["onnx"]),
                     "backbone_ms": statistics.median(t["backbone"]),
                     # per round: the detector's time over the backbone's in the same round
                     "share_torch": statistics.median(a / b for a, b in zip(t["torch"], t["backbone"])),
                     "share_onnx": statistics.median(a / b for a, b in zip(t["onnx"], t["backbone"]))})
        r = rows[-1]
        print(f"{label}: backbone {r['backbone_ms']:.0f} ms, torch {r['torch_1_thread_ms']:.1f} ms "
              f"({100 * r['share_torch']:.1f}%), onnx {r['onnx_1_thread_ms']:.1f} ms ({100 * r['share_onnx']:.1f}%)",
              flush=True)
    ref = statistics.median(refs)
    res = {"command": "python bench/byo/magnet_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started, "machine": machine(), "load_average_start": load_start, "load_average_end": loadavg(),
           "onnxruntime": ort.__version__, "torch": torch.__version__, "batch": args.batch, "threads": args.threads,
           "backbone_ms": ref, "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# MagNet at 3x224x224 next to a ResNet-50 forward (in isolation)", "",
             f"Command: `{res['command']}` ({res['started_utc']}; load average {res['load_average_start']} at the start, "
             f"{res['load_average_end']} at the end, on {res['machine']['cores']} cores: other jobs share them when it is "
             f"above 1). ONNX Runtime {res['onnxruntime']}, torch {res['torch']}. Median of {args.repeats} "
             "rounds after 2 warm-up runs, the backbone and the detector timed in the same round (shares are medians "
             "of per-round ratios); random weights.", "",
             f"Reference: torchvision ResNet-50 in ONNX Runtime, {args.threads} intra-op threads, batch {args.batch}: "
             f"**{ref:.0f} ms** (median over all rounds).", "",
             "The MagNet stage's work on the same batch (autoencoder + L1 error): in torch on one thread (`runtime: "
             "torch`, the default; the proxy pins torch to one thread) and in ONNX Runtime (`runtime: onnx`, "
             "`onnx_threads: 1`). Share = detector time / backbone time; run one after the other it costs "
             "share / (1 + share) of the throughput.", "",
             "| autoencoder | downsample | params | torch ms | share | onnx ms | share |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['autoencoder']} | {r['downsample']} | {r['params']:,} | {r['torch_1_thread_ms']:.1f} | "
                     f"{100 * r['share_torch']:.1f}% | {r['onnx_1_thread_ms']:.1f} | {100 * r['share_onnx']:.1f}% |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
