"""Where the proxy's added p50 in front of an upstream goes, at 3x224x224 (issue 21's MLServer line) or
any other input shape (``--shape 1,28,28``: the serving benchmark's Fashion-MNIST size, issue 25's).

A model with next to no compute (average pool to 4x4 + a linear layer to 1000 classes: what is
left is transport and the proxy's own work), imported with ``robustgate import`` and served by
bench/serving/bare_v2.py (a bare grpc.aio V2 server, the same ONNX Runtime session). Batch-1 FP32
requests at concurrency 1, the calls of each round interleaved over these paths:

- ``direct``: a grpc.aio client -> the bare server (the reference);
- ``proxy_inprocess``: -> robustgate serving the same ONNX in its own session (``backend.kind:
  onnxruntime``): the proxy's own work per call against a bare server's;
- ``proxy_upstream``: -> robustgate -> the bare server (``backend.kind: upstream``): the proxy's
  own work plus its upstream hop;
- ``sync_round_trip``: the same request, serialized once, sent to the bare server with grpcio's
  synchronous client from a plain thread, as proxy/backends/upstream.py sends it: what one more
  gRPC transfer of the request costs, by itself.

    python bench/byo/upstream_hop.py [--calls 500] [--rounds 5] [--out bench/results/byo.upstream_hop]
    python bench/byo/upstream_hop.py --shape 1,28,28 --out bench/results/byo.upstream_hop.28x28

Writes OUT.json + OUT.md (p50 per path and round, the median over rounds, and the differences).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resnet50 as r50  # noqa: E402  (bench/byo/resnet50.py: its bare V2 server; bench/serving/run.py as .serving)

serving = r50.serving

from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pbg  # noqa: E402
from robustgate.proxy.backends.upstream import MODEL_INFER_METHOD  # noqa: E402

MODEL = "hop"
BATCHING = {"max_batch_size": 16}  # as bench/byo/resnet50.py serves
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def export_model(path: Path, shape: tuple[int, int, int]) -> None:
    """``input`` [N, C, H, W] -> ``logits`` [N, 1000] through a 4x4 average pool: no compute to speak of."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(shape[0] * 16, 1000)).eval()
    torch.onnx.export(net, (torch.rand(2, *shape),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def request(shape: tuple[int, int, int]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, *shape])
    req.raw_input_contents.append(np.random.default_rng(0).random((1, *shape), dtype=np.float32).tobytes())
    return req


async def aio_p50(url: str, req: pb.ModelInferRequest, calls: int, warmup: int) -> float:
    """Median ms of ``calls`` sequential ModelInfer calls (grpc.aio, one channel) after ``warmup``."""
    async with grpc.aio.insecure_channel(url, options=OPTIONS) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        for _ in range(warmup):
            await stub.ModelInfer(req)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.ModelInfer(req)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def sync_p50(url: str, req: pb.ModelInferRequest, calls: int, warmup: int) -> float:
    """The same, with grpcio's synchronous client and the request serialized once (raw bytes)."""
    raw = req.SerializeToString()
    with grpc.insecure_channel(url, options=OPTIONS) as channel:
        call = channel.unary_unary(MODEL_INFER_METHOD, request_serializer=None, response_deserializer=None)
        for _ in range(warmup):
            call(raw)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call(raw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500, help="measured calls per path and round (default 500)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default="3,224,224", help="C,H,W of one item (default 3,224,224)")
    ap.add_argument("--out", default="bench/results/byo.upstream_hop")
    args = ap.parse_args(argv)
    command = "python bench/byo/upstream_hop.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), serving.loadavg()
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3 or min(shape) < 1:
        ap.error(f"--shape: C,H,W of positive ints, got {args.shape!r}")
    work = Path(tempfile.mkdtemp(prefix="robustgate-hop-"))
    onnx_file, bundle = work / "hop.onnx", work / "bundle"
    export_model(onnx_file, shape)
    subprocess.run([sys.executable, "-m", "robustgate.proxy.cli", "import", "--onnx", str(onnx_file), "--out",
                    str(bundle), "--name", MODEL], check=True, stdout=subprocess.DEVNULL)
    servers = []
    try:
        bare = r50.BareServer(work, str(onnx_file), MODEL)
        servers.append(bare)
        inproc = serving.Proxy(work, bundle, {"backend": {"kind": "onnxruntime"}, "batching": BATCHING}, None, MODEL)
        servers.append(inproc)
        upstream = serving.Proxy(work, bundle, {"backend": {"kind": "upstream"}, "batching": BATCHING}, bare.url, MODEL)
        servers.append(upstream)
        req = request(shape)
        paths = {
            "direct": lambda: asyncio.run(aio_p50(bare.url, req, args.calls, args.warmup)),
            "proxy_inprocess": lambda: asyncio.run(aio_p50(inproc.url, req, args.calls, args.warmup)),
            "proxy_upstream": lambda: asyncio.run(aio_p50(upstream.url, req, args.calls, args.warmup)),
            "sync_round_trip": lambda: sync_p50(bare.url, req, args.calls, args.warmup),
        }
        rounds: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(args.rounds):
            for name, fn in paths.items():
                rounds[name].append(fn())
            print(f"round {i + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.3f} ms" for k, v in rounds.items()),
                  flush=True)
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    p50 = {k: statistics.median(v) for k, v in rounds.items()}
    added = {k: [a - b for a, b in zip(rounds[k], rounds["direct"])] for k in ("proxy_inprocess", "proxy_upstream")}
    derived = {
        "inprocess_added_ms": statistics.median(added["proxy_inprocess"]),
        "upstream_added_ms": statistics.median(added["proxy_upstream"]),
        "sync_round_trip_ms": p50["sync_round_trip"],
    }
    derived["upstream_added_over_sync_round_trip"] = derived["upstream_added_ms"] / derived["sync_round_trip_ms"]
    res = {"command": command, "started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": serving.machine(), "load_average_start": load_start, "load_average_end": serving.loadavg(),
           "shape": [1, *shape], "calls": args.calls, "warmup": args.warmup, "rounds": rounds, "p50_ms": p50,
           "derived": derived}
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(r: dict) -> str:
    m, d = r["machine"], r["derived"]
    hop = d["upstream_added_ms"] - d["inprocess_added_ms"]  # the upstream path's extra over the in-process one
    lines = [
        f"# The proxy's added p50 in front of an upstream at {'x'.join(map(str, r['shape'][1:]))}: its own work "
        "and its hop",
        "",
        f"Command: `{r['command']}` (started {r['started_utc']}, finished {r['finished_utc']}).",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; load average {r['load_average_start']} at the start, "
        f"{r['load_average_end']} at the end. Client, proxy and bare server share the cores.",
        "",
        f"Batch-1 FP32 requests {r['shape']} ({4 * math.prod(r['shape']) / 1024:.0f} KiB), concurrency 1, {r['calls']} calls per path and round after "
        f"{r['warmup']} warm-up calls, the paths interleaved in each of {len(r['rounds']['direct'])} rounds. Model: a "
        "4x4 average pool and a linear layer (no compute to speak of), served by bench/serving/bare_v2.py (the "
        "reference) and by robustgate.",
        "",
        "| path | p50 ms per round | median |",
        "| --- | --- | ---: |",
    ]
    for k, v in r["rounds"].items():
        lines.append(f"| {k} | {', '.join(f'{t:.3f}' for t in v)} | {r['p50_ms'][k]:.3f} |")
    lines += [
        "",
        f"- The proxy's own work per call (in-process backend over the bare server): **{d['inprocess_added_ms']:+.3f} ms**.",
        f"- In front of the bare server as its upstream the proxy adds **{d['upstream_added_ms']:+.3f} ms**: its own "
        f"work and {hop:.3f} ms for the hop, against {d['sync_round_trip_ms']:.3f} ms for one gRPC round trip of the "
        f"same request by itself (grpcio's sync client, as the upstream backend sends it); the added p50 is "
        f"{d['upstream_added_over_sync_round_trip']:.2f}x that round trip.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
