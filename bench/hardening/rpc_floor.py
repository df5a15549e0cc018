"""The event loop's floor: server CPU per ModelInfer call for a do-nothing grpc.aio server and for
``robustgate serve``'s cheapest and its full answer paths (issue 9, overload: why refusals wait).

A refusal is cheap in robustgate's handler, but every call also pays grpc.aio's own per-call work on
the server's event loop; at 1,500 calls/s that work alone can fill much of a core. Measured here,
each server alone, a closed-loop grpc.aio client (``--concurrency`` calls in flight, in this process)
sending ``--calls`` calls of 2 Fashion-MNIST test images (raw FP32):

- ``grpc.aio, abort``: a grpc.aio server whose ModelInfer only aborts with RESOURCE_EXHAUSTED (no
  robustgate code): the transport's floor;
- ``grpc.aio, maximum_concurrent_rpcs 1``: the same server with grpc.aio's own concurrency limit
  at 1 (the one admitted call holds its slot 50 ms): the calls beyond it are refused
  RESOURCE_EXHAUSTED by grpc.aio's Cython code before any handler runs;
- ``robustgate, NOT_FOUND``: ``robustgate serve`` (deploy/default.yaml) asked for an unknown model,
  answered before any decoding -- the path a refusal takes through the handler;
- ``robustgate, served``: the same server answering the clean images (decode, batcher, MagNet +
  backbone, encode).

Per call: the server process's CPU (user + system, every thread: event loop, gRPC's poller, ONNX
Runtime) divided by the calls; and calls/s of the closed loop.

    .venv/bin/python bench/hardening/rpc_floor.py --out hardening.rpc_floor
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

TRIVIAL_SERVER = textwrap.dedent("""
    import asyncio, sys, grpc
    from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

    LIMIT = int(sys.argv[1])  # 0: the handler aborts every call; else grpc.aio's concurrency limit

    class Abort(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            if LIMIT:  # holds its slot a while: the calls beyond the limit are refused by grpc.aio
                await asyncio.sleep(0.05)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")

    async def main():
        server = grpc.aio.server(maximum_concurrent_rpcs=LIMIT or None)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Abort(), server)
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())
""")


async def closed_loop(url: str, request: pb.ModelInferRequest, calls: int, concurrency: int, pid: int) -> dict:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        codes: dict[str, int] = {}

        async def one() -> None:
            try:
                await stub.ModelInfer(request, timeout=60)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

        for _ in range(200):  # warm-up, not counted
            await one()
        codes.clear()
        slots = asyncio.Semaphore(concurrency)

        async def limited() -> None:
            async with slots:
                await one()

        cpu0, t0 = common.process_cpu_s(pid), time.perf_counter()
        await asyncio.gather(*(limited() for _ in range(calls)))
        wall, cpu = time.perf_counter() - t0, common.process_cpu_s(pid) - cpu0
    return {"calls": calls, "calls_per_s": calls / wall, "server_cpu_us_per_call": cpu / calls * 1e6,
            "server_cores": cpu / wall, "codes": codes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default="hardening.rpc_floor", help="results name in bench/results (OUT.json, OUT.md)")
    args = ap.parse_args(argv)
    x, _ = common.test_images(2)
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), common.loadavg()
    rows = []

    for label, limit in (("grpc.aio, abort", 0), ("grpc.aio, maximum_concurrent_rpcs 1", 1)):
        proc = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(limit)], stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            res = asyncio.run(closed_loop(f"127.0.0.1:{port}", common.infer_request("default", x), args.calls,
                                          args.concurrency, proc.pid))
            rows.append({"server": label, **res})
        finally:
            proc.kill()
            proc.wait(10)

    server = common.Serve(common.REPO / "deploy" / "default.yaml")
    try:
        for label, model in (("robustgate, NOT_FOUND", "no-such-model"), ("robustgate, served", server.model)):
            res = asyncio.run(closed_loop(server.url, common.infer_request(model, x), args.calls, args.concurrency,
                                          server.pid))
            rows.append({"server": label, **res})
    finally:
        server.stop()

    data = {"command": " ".join(["python", "bench/hardening/rpc_floor.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": started, "load_average_start": load_start, "load_average_end": common.loadavg(),
            "machine": common.machine(), "calls": args.calls, "concurrency": args.concurrency, "rows": rows}
    lines = ["# Hardening: the event loop's floor per ModelInfer call", "",
             f"- Command: `{data['command']}`",
             f"- Started {started}; load average at start {load_start}, at end {data['load_average_end']} "
             "(2 cores, shared with other jobs); client and server on the same cores",
             f"- {args.calls} calls of 2 test images each, {args.concurrency} in flight (closed loop), after 200 warm-up calls",
             "", "| server | answers | calls/s | server CPU per call (µs) | server cores |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        lines.append(f"| {r['server']} | {codes} | {r['calls_per_s']:,.0f} | {r['server_cpu_us_per_call']:.0f} | "
                     f"{r['server_cores']:.2f} |")
    floor = rows[0]["server_cpu_us_per_call"]
    lines += ["", f"At 1,500 calls/s the transport's floor alone is {floor * 1500 / 1e6:.2f} of a core of server CPU.", ""]
    js, md = common.write_results(args.out, data, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
