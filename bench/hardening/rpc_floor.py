"""The event loop's floor: server CPU per ModelInfer call for a do-nothing grpc.aio server and for
each of ``robustgate serve``'s answer paths, with one and with two worker processes (issues 9, 25).

A refusal is cheap in robustgate's handler, but every call also pays grpc.aio's own per-call work on
the server's event loop; at 1,500 calls/s that work alone can fill much of a core. Measured here,
each server alone, a closed-loop grpc.aio client in this process (``--concurrency`` calls in flight
over ``--channels`` connections of their own, so that ``server.workers`` processes sharing the port
each get some) sending ``--calls`` batch-1 calls (one Fashion-MNIST test image, raw FP32):

- ``grpc.aio, abort``: a grpc.aio server whose ModelInfer only aborts with RESOURCE_EXHAUSTED (no
  robustgate code): the transport's floor, on uvloop (what ``robustgate serve`` runs on by default,
  ``server.event_loop``) and on asyncio's own loop;
- ``grpc.aio, maximum_concurrent_rpcs 1``: the same server with grpc.aio's own concurrency limit
  at 1 (the one admitted call holds its slot 50 ms): the calls beyond it are refused
  RESOURCE_EXHAUSTED by grpc.aio's Cython code before any handler runs;
- ``robustgate, NOT_FOUND``: ``robustgate serve`` (deploy/default.yaml) asked for an unknown model,
  answered before any decoding -- the path a refusal takes through the handler;
- ``robustgate, served``: the same server answering the clean image (decode, batcher, MagNet +
  backbone, encode);
- ``robustgate, rejected``: the same server refusing an image of uniform noise that MagNet rejects
  (PERMISSION_DENIED, request mode);
- ``robustgate, served, trivial model``: ``robustgate serve`` with no stage in front of a one-layer
  linear classifier (784 x 10, imported with ``robustgate import``; a few microseconds of model work
  per batch): the served path's own CPU -- decode, batcher, the runner (its pass-through path: one
  backend call), encode -- without the model's compute;

and, apart, the CPU per item of the default pipeline's models (its fused ONNX Runtime pass on batches of 10,
in this process): the part of a served call that is the models' compute, not robustgate's;

each of the robustgate rows with ``server.workers`` 1 and 2 on the default loop (uvloop), and with one
worker on asyncio's loop (``--loops``). Per call: the server's CPU (user +
system, every thread of the process and, with workers, of the supervisor and its children) divided
by the calls; and calls/s of the closed loop. ``--profile``: a py-spy flame graph of the served path
(one worker) is written beside the results (``OUT.served.svg``).

    .venv/bin/python bench/hardening/rpc_floor.py --profile --out hardening.rpc_floor  # 3 rounds, ~5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

TRIVIAL_SERVER = textwrap.dedent("""
    import asyncio, sys, grpc
    from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

    LIMIT = int(sys.argv[1])  # 0: the handler aborts every call; else grpc.aio's concurrency limit
    LOOP = sys.argv[2]  # "asyncio" or "uvloop": the loop that runs it

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

    if LOOP == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
""")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (a supervisor and its worker processes)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += common.process_cpu_s(p)
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


async def closed_loop(url: str, request: pb.ModelInferRequest, calls: int, concurrency: int, pid: int,
                      channels: int = 8) -> dict:
    """``calls`` calls, ``concurrency`` in flight, spread over ``channels`` connections of their own
    (grpc shares one connection among a process's channels to a target unless told not to)."""
    opened = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in opened]
        codes: dict[str, int] = {}
        turn = [0]

        async def one() -> None:
            turn[0] += 1
            try:
                await stubs[turn[0] % channels].ModelInfer(request, timeout=60)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

        for _ in range(max(200, 20 * channels)):  # warm-up (every connection up), not counted
            await one()
        codes.clear()
        slots = asyncio.Semaphore(concurrency)

        async def limited() -> None:
            async with slots:
                await one()

        cpu0, t0 = tree_cpu_s(pid), time.perf_counter()
        await asyncio.gather(*(limited() for _ in range(calls)))
        wall, cpu = time.perf_counter() - t0, tree_cpu_s(pid) - cpu0
    finally:
        for ch in opened:
            await ch.close()
    return {"calls": calls, "calls_per_s": calls / wall, "server_cpu_us_per_call": cpu / calls * 1e6,
            "server_cores": cpu / wall, "codes": codes}


def rejected_image(seed: int = 0) -> np.ndarray:
    """[1, 1, 28, 28] uniform noise in [0, 1]: nothing like a garment, MagNet rejects it."""
    return np.random.default_rng(seed).random((1, 1, 28, 28), dtype=np.float32)


def profile(server: "common.Serve", request: pb.ModelInferRequest, args, svg: Path) -> None:
    """A py-spy flame graph of the served path under the same load (every thread, 200 Hz)."""
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(server.pid), "-o", str(svg),
                            "-r", "200", "-d", "15", "--threads", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        while spy.poll() is None:
            asyncio.run(closed_loop(server.url, request, 2000, args.concurrency, server.pid, args.channels))
    finally:
        spy.wait(60)


def model_cpu_us_per_item(batch: int = 10, calls: int = 1000) -> float:
    """CPU µs per item of ``deploy/default.yaml``'s fused pass (MagNet's autoencoder and the backbone in one
    ONNX Runtime session, the server's session options) on batches of ``batch`` test-like items, run in
    this process: the models' share of a served call, which no change to robustgate's code removes."""
    from robustgate.proxy.config import load_config
    from robustgate.proxy.serve import build_server

    cfg = load_config(common.REPO / "deploy" / "default.yaml", environ={},
                      overrides={"bundle": str(common.REPO / "bundles" / "default"),
                                 "server": {"port": 0, "metrics_port": None}})
    server = build_server(cfg)
    try:
        fused = server.runner.fused
        x = np.random.default_rng(0).random((batch, *server.bundle.input.shape), dtype=np.float32)
        for _ in range(50):
            fused(x)
        c0 = time.process_time()
        for _ in range(calls):
            fused(x)
        return (time.process_time() - c0) / (calls * batch) * 1e6
    finally:
        server.backend.close()


def trivial_bundle(root: Path) -> Path:
    """A bundle around a one-layer linear classifier ``[N, 1, 28, 28] -> [N, 10]`` (seeded random
    weights), made the way a user makes one: exported to ONNX, then ``robustgate import``."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    onnx_path = root / "linear.onnx"
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(onnx_path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    bundle = root / "linear"
    subprocess.run([str(Path(sys.executable).with_name("robustgate")), "import", "--onnx", str(onnx_path), "--out",
                    str(bundle), "--classes", "10", "--name", "linear"], check=True, stdout=subprocess.DEVNULL)
    return bundle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=6000, help="calls per row and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row reports their median")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--channels", type=int, default=8, help="client connections the calls are spread over")
    ap.add_argument("--workers", default="1,2", help="server.workers values to measure robustgate with")
    ap.add_argument("--loops", default="uvloop,asyncio",
                    help="server.event_loop values: the first with every --workers value, the others with one worker")
    ap.add_argument("--profile", action="store_true", help="write a py-spy flame graph of the served path (OUT.served.svg)")
    ap.add_argument("--out", default="hardening.rpc_floor", help="results name in bench/results (OUT.json, OUT.md)")
    args = ap.parse_args(argv)
    x, _ = common.test_images(1)  # [1, 1, 28, 28]
    noise = rejected_image()
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), common.loadavg()
    loops = args.loops.split(",")
    floors = [("grpc.aio, abort", 0, loop) for loop in loops] + [("grpc.aio, maximum_concurrent_rpcs 1", 1, loops[0])]
    runs = [(loops[0], int(w)) for w in args.workers.split(",")] + [(loop, 1) for loop in loops[1:]]
    samples: dict[tuple[str, str, int], list[dict]] = {}  # (server, loop, workers) -> one result per round

    def measure_floor(label: str, limit: int, loop: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(limit), loop], stdout=subprocess.PIPE,
                                text=True)
        try:
            port = int(proc.stdout.readline())
            res = asyncio.run(closed_loop(f"127.0.0.1:{port}", common.infer_request("default", x), args.calls,
                                          args.concurrency, proc.pid, args.channels))
            samples.setdefault((label, loop, 1), []).append(res)
        finally:
            proc.kill()
            proc.wait(10)

    def measure_robustgate(loop: str, workers: int, profile_it: bool) -> Path | None:
        server = common.Serve(common.REPO / "deploy" / "default.yaml",
                              overrides={"server": {"workers": workers, "event_loop": loop}})
        try:
            for label, model, image in (("robustgate, NOT_FOUND", "no-such-model", x), ("robustgate, served", server.model, x),
                                        ("robustgate, rejected", server.model, noise)):
                res = asyncio.run(closed_loop(server.url, common.infer_request(model, image), args.calls, args.concurrency,
                                              server.pid, args.channels))
                samples.setdefault((label, loop, workers), []).append(res)
            if profile_it:
                svg = common.RESULTS / f"{args.out}.served.svg"
                profile(server, common.infer_request(server.model, x), args, svg)
                return svg
        finally:
            server.stop()
        return None

    def measure_trivial(bundle: Path) -> None:
        server = common.Serve(common.REPO / "deploy" / "default.yaml",
                              overrides={"bundle": str(bundle), "server": {"workers": 1, "event_loop": loops[0]},
                                         "pipeline": {"stages": []}})
        try:
            res = asyncio.run(closed_loop(server.url, common.infer_request(server.model, x), args.calls, args.concurrency,
                                          server.pid, args.channels))
            samples.setdefault(("robustgate, served, trivial model", loops[0], 1), []).append(res)
        finally:
            server.stop()

    svg = None
    with tempfile.TemporaryDirectory(prefix="robustgate-rpc-floor-") as tmp:
        trivial = trivial_bundle(Path(tmp))
        jobs = ([functools.partial(measure_floor, *f) for f in floors] + [("robustgate", r) for r in runs]
                + [functools.partial(measure_trivial, trivial)])
        for rnd in range(args.rounds):  # interleaved rounds, the order reversed every other round
            for job in (jobs if rnd % 2 == 0 else jobs[::-1]):
                print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}/{args.rounds}", flush=True)
                if isinstance(job, tuple):
                    loop, workers = job[1]
                    first = rnd == 0 and workers == 1 and loop == loops[0]
                    got = measure_robustgate(loop, workers, args.profile and first)
                    svg = svg or got
                else:
                    job()
    model_us = model_cpu_us_per_item()
    rows = []
    for (label, loop, workers), results in samples.items():
        cpu = [r["server_cpu_us_per_call"] for r in results]
        codes: dict[str, int] = {}
        for r in results:
            for k, v in r["codes"].items():
                codes[k] = codes.get(k, 0) + v
        rows.append({"server": label, "loop": loop, "workers": workers, "calls": sum(r["calls"] for r in results),
                     "calls_per_s": statistics.median(r["calls_per_s"] for r in results),
                     "server_cpu_us_per_call": statistics.median(cpu), "server_cpu_us_per_call_rounds": cpu,
                     "server_cores": statistics.median(r["server_cores"] for r in results), "codes": codes})

    data = {"command": " ".join(["python", "bench/hardening/rpc_floor.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": started, "load_average_start": load_start, "load_average_end": common.loadavg(),
            "machine": common.machine(), "rounds": args.rounds, "calls": args.calls, "concurrency": args.concurrency,
            "channels": args.channels, "model_cpu_us_per_item_batch10": model_us,
            "flame_graph": None if svg is None else svg.name, "rows": rows}
    floor = {r["loop"]: r["server_cpu_us_per_call"] for r in rows if r["server"] == "grpc.aio, abort"}
    lines = ["# Hardening: the event loop's floor per ModelInfer call", "",
             f"- Command: `{data['command']}`",
             f"- Started {started}; load average at start {load_start}, at end {data['load_average_end']} "
             f"({os.cpu_count()} cores, shared with other jobs: compare rows within this run); client and server on the "
             "same cores",
             f"- {args.calls} batch-1 calls (one test image) per row and round, {args.concurrency} in flight (closed "
             f"loop) over {args.channels} connections, after a warm-up; {args.rounds} interleaved rounds (the order "
             "reversed every other round), each figure their median, the CPU per call of every round beside it; "
             "`deploy/default.yaml` (MagNet + backbone); the last row "
             "with no stage in front of a one-layer linear model (the served path without the model's compute)",
             "", "| server | loop | workers | answers | calls/s | server CPU per call (µs) | per round | "
             "over the loop's floor (µs) | server cores |",
             "| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        us = r["server_cpu_us_per_call"]
        each = ", ".join(f"{v:.0f}" for v in r["server_cpu_us_per_call_rounds"])
        lines.append(f"| {r['server']} | {r['loop']} | {r['workers']} | {codes} | {r['calls_per_s']:,.0f} | {us:.0f} | "
                     f"{each} | {us - floor[r['loop']]:+.0f} | {r['server_cores']:.2f} |")
    lines += ["", f"At 1,500 calls/s the transport's floor alone is {floor[loops[0]] * 1500 / 1e6:.2f} of a core of "
              f"server CPU on {loops[0]}."]
    trivial = next((r for r in rows if r["server"] == "robustgate, served, trivial model"), None)
    served = next((r for r in rows if r["server"] == "robustgate, served" and r["workers"] == 1
                   and r["loop"] == loops[0]), None)
    other = [r for r in rows if r["server"] == "robustgate, served" and r["loop"] != loops[0]]
    if served is not None and other:
        lines += ["", "The loop's share, served calls with one worker: " + ", ".join(
            f"{r['server_cpu_us_per_call']:.0f} µs per call on {r['loop']}" for r in other)
            + f", {served['server_cpu_us_per_call']:.0f} on {loops[0]}."]
    if trivial is not None and served is not None:
        own, full = trivial["server_cpu_us_per_call"], served["server_cpu_us_per_call"]
        lines += ["", f"The served path's own CPU with a trivial model and no stage: {own:.0f} µs per call, "
                  f"{own - floor[loops[0]]:+.0f} over the floor, against {full:.0f} for `deploy/default.yaml` "
                  "(MagNet + backbone): "
                  "at 32 calls in flight the batches are large (about 10 items), so the models' compute per call "
                  "is small; a pipeline with no stage takes the pass-through path, the default's fused detector "
                  "the one-session fast path."]
    if served is not None:
        own = served["server_cpu_us_per_call"] - model_us
        lines += ["", f"The models' compute: `deploy/default.yaml`'s fused pass (MagNet's autoencoder and the backbone "
                  f"in one ONNX Runtime session) costs {model_us:.0f} µs of CPU per item on batches of 10 (about the "
                  f"size the served row's batches have), measured alone in this process. The served call without it: "
                  f"{own:.0f} µs, of which {floor[loops[0]]:.0f} are grpc.aio's floor on {loops[0]} and "
                  f"{own - floor[loops[0]]:.0f} robustgate's own work (decode, batcher, verdicts, encode)."]
    if svg is not None:
        lines += ["", f"Flame graph of the served path (one worker, py-spy, every thread): [{svg.name}]({svg.name})."]
    lines.append("")
    js, md = common.write_results(args.out, data, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
