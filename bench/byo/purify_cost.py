"""What the JPEG and median purifiers cost next to a ResNet-50 forward at 3x224x224, measured in
isolation (issue 21: each stage must cost <= 10% of the proxy's throughput there).

Per batch size, each stage's ``purify`` on a batch of uniform noise (what bench/byo/resnet50.py
sends; JPEG's worst case) is timed as the proxy runs it: torch on one intra-op thread (``robustgate
serve`` pins it), the batch in one part (``pipeline.purify_threads: 1``) and in parts computed at
once (``purify_threads`` = the cores, the serve default; defenses/purify/parts.py). The reference is
torchvision's ResNet-50 exported to ONNX in ONNX Runtime with the proxy's session options (its
default intra-op threads, ``spinning: false``) on the same batch. Recorded per stage: wall ms and
CPU ms per image (the process's CPU time: every thread), and ``share`` = stage wall / backbone wall
in the same round -- run one after the other, as the proxy's batch worker runs them, the stage costs
``share / (1 + share)`` of the throughput.

    python bench/byo/purify_cost.py [--batches 1,16] [--repeats 7] [--out bench/results/byo.purify_cost]

Writes OUT.json + OUT.md (--repeats rounds after 2 warm-up calls, everything timed in each round;
shares are medians of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from magnet_cost import loadavg, machine, onnx_bytes  # noqa: E402  (bench/byo/magnet_cost.py)

from robustgate.defenses.base import build  # noqa: E402
from robustgate.defenses.purify import parts  # noqa: E402
from robustgate.proxy.backends.onnx import SPINNING_CONFIG  # noqa: E402
from robustgate.proxy.workers import default_workers  # noqa: E402

SHAPE = (3, 224, 224)
STAGES = {"median 3x3": ("median", {"kernel_size": 3}), "JPEG q75": ("jpeg", {"quality": 75})}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    c0, t0 = cpu_s(), time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3, (cpu_s() - c0) * 1e3


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "byo.purify_cost")
    args = p.parse_args(argv)
    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), loadavg()
    torch.set_num_threads(1)  # as robustgate serve runs the torch stages (defenses/assemble.py pin_torch_threads)
    cores = default_workers()  # what robustgate serve sets pipeline.purify_threads to by default
    torch.manual_seed(0)
    opts = ort.SessionOptions()
    for key, value in SPINNING_CONFIG[False].items():  # the proxy's session options
        opts.add_session_config_entry(key, value)
    backbone = ort.InferenceSession(onnx_bytes(torchvision.models.resnet50(weights=None)), opts,
                                    providers=["CPUExecutionProvider"])
    variants = {"backbone": None}
    for label, (kind, params) in STAGES.items():
        variants[f"{label}, 1 part"] = (build(kind, **params), 1)
        if cores > 1:
            variants[f"{label}, {cores} parts"] = (build(kind, **params), cores)
    rows = []
    for n in [int(b) for b in args.batches.split(",")]:
        x = np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)  # [N, 3, 224, 224] in [0, 1)
        xt = torch.from_numpy(x)

        def call(variant):
            if variant is None:
                return lambda: backbone.run(None, {"input": x})
            purifier, threads = variant

            def run():
                parts.set_threads(threads)
                with torch.no_grad():
                    purifier.purify(xt)
            return run

        fns = {name: call(v) for name, v in variants.items()}
        for fn in fns.values():
            fn(), fn()
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                got[name].append(timed(fn))
        parts.set_threads(1)
        ref = got["backbone"]
        for name, t in got.items():
            rows.append({"batch": n, "what": name, "wall_ms_per_image": statistics.median(w for w, _ in t) / n,
                         "cpu_ms_per_image": statistics.median(c for _, c in t) / n,
                         "share": None if name == "backbone" else statistics.median(w / r[0] for (w, _), r in zip(t, ref)),
                         "cpu_share": None if name == "backbone" else statistics.median(c / r[1] for (_, c), r in zip(t, ref))})
            r = rows[-1]
            share = "" if r["share"] is None else f", share {100 * r['share']:.1f}% (cpu {100 * r['cpu_share']:.1f}%)"
            print(f"batch {n} {name}: {r['wall_ms_per_image']:.2f} ms wall, {r['cpu_ms_per_image']:.2f} ms cpu per image{share}",
                  flush=True)
    res = {"command": "python bench/byo/purify_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started, "machine": machine(), "load_average_start": load_start, "load_average_end": loadavg(),
           "onnxruntime": ort.__version__, "torch": torch.__version__, "cores": cores, "repeats": args.repeats, "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# JPEG and median at 3x224x224 next to a ResNet-50 forward (in isolation)", "",
             f"Command: `{res['command']}` ({started}; revision {res['machine']['robustgate_revision']}; load average "
             f"{load_start} at the start, {res['load_average_end']} at the end, on {res['machine']['cores']} cores: other "
             f"jobs share them when it is above 1). ONNX Runtime {res['onnxruntime']}, torch {res['torch']} on one "
             f"intra-op thread. Median of {args.repeats} rounds after 2 warm-up calls, everything timed in each round; "
             "inputs: uniform noise in [0, 1) (JPEG's worst case).", "",
             "Backbone: torchvision ResNet-50 (random weights) in ONNX Runtime with the proxy's session options "
             "(default intra-op threads, `spinning: false`). A stage's `share` is its wall time over the backbone's "
             "on the same batch (median of per-round ratios); the proxy's batch worker runs the two one after the "
             "other, so the stage costs share / (1 + share) of the throughput. `N parts`: the batch split into "
             "parts computed at once (defenses/purify/parts.py; `pipeline.purify_threads`, default the cores); "
             "CPU is the whole process's.", "",
             "| batch | what | wall ms / image | CPU ms / image | share (wall) | share (CPU) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(f"| {r['batch']} | {r['what']} | {r['wall_ms_per_image']:.2f} | {r['cpu_ms_per_image']:.2f} | "
                     f"{pct(r['share'])} | {pct(r['cpu_share'])} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
