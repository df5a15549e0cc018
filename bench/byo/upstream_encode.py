"""What building the upstream's ModelInferRequest costs the proxy, per request shape: the message
built with protobuf, pixels in its ``raw_input_contents`` (the proxy's encoding until 2026-12-04),
against ``proxy.backends.upstream.encode_request`` (the header built with protobuf, the pixels
appended in one copy), each followed by what the sync stub then does with it (serialize / nothing).

    python bench/byo/upstream_encode.py [--repeats 300] [--out bench/results/byo.upstream_encode]

Each call gets a freshly computed input array, as the proxy's batch worker does (one reused array
would stay in the caches and hide what the copies cost). Writes OUT.json +
OUT.md (median microseconds per call after 20 warm-up calls; the two encodings interleaved).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from google.protobuf.internal import api_implementation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from magnet_cost import loadavg, machine  # noqa: E402  (bench/byo/magnet_cost.py)

from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.proxy.backends.upstream import encode_request  # noqa: E402

SHAPES = [(64, 1, 28, 28), (1, 3, 32, 32), (16, 3, 32, 32), (1, 3, 224, 224), (16, 3, 224, 224)]


def protobuf_built(x: np.ndarray) -> bytes:
    """The message with the pixels in it, serialized as the generated stub does."""
    req = pb.ModelInferRequest(model_name="model", model_version="")
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend(x.shape)
    req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return req.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", default="bench/results/byo.upstream_encode")
    args = ap.parse_args(argv)
    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), loadavg()
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        base = rng.random(shape, dtype=np.float32)
        fns = {"protobuf": protobuf_built, "hand": lambda x: encode_request(x, "input", "model", "")}
        assert pb.ModelInferRequest.FromString(fns["hand"](base)) == pb.ModelInferRequest.FromString(protobuf_built(base))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(20 + args.repeats):
            for name, fn in fns.items():
                x = base + np.float32(i % 2)  # a new array each call, as a batch worker's
                t0 = time.perf_counter()
                fn(x)
                if i >= 20:
                    times[name].append((time.perf_counter() - t0) * 1e6)
        row = {"shape": list(shape), "mib": base.nbytes / 2**20,
               **{f"{k}_us": statistics.median(v) for k, v in times.items()}}
        row["saved_us"] = row["protobuf_us"] - row["hand_us"]
        rows.append(row)
        print(f"{shape}: protobuf {row['protobuf_us']:.0f} us, hand {row['hand_us']:.0f} us", flush=True)
    res = {"command": "python bench/byo/upstream_encode.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started, "machine": machine(), "load_average_start": load_start, "load_average_end": loadavg(),
           "protobuf_implementation": api_implementation.Type(), "repeats": args.repeats, "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Encoding the upstream's ModelInferRequest", "",
             f"Command: `{res['command']}` ({started}; revision {res['machine']['robustgate_revision']}; load average "
             f"{load_start} at the start, {res['load_average_end']} at the end, {res['machine']['cores']} cores); "
             f"protobuf's `{res['protobuf_implementation']}` implementation. Median microseconds per call over "
             f"{args.repeats} calls after 20 warm-up calls, a new input array each call, the two encodings interleaved.",
             "",
             "`protobuf`: the message built with the pixels in `raw_input_contents` and serialized (what the generated "
             "stub sends). `hand`: `proxy.backends.upstream.encode_request`, the header serialized by protobuf and the "
             "pixels appended as field 7 in one copy (the same bytes on the wire; parsed back equal).", "",
             "| request [N, C, H, W] | MiB | protobuf us | hand us | saved us |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mib']:.2f} | {r['protobuf_us']:.0f} | {r['hand_us']:.0f} | {r['saved_us']:.0f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
