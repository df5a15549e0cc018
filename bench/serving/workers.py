"""Serving with ``server.workers`` 1, 2, ...: batch-1 items/s against the raw ONNX Runtime ceiling (issue 25).

The ceiling is raw in-process ONNX Runtime on the bundle's backbone (bench/serving/loadgen.py
``run_raw_ort``): the best items/s at any batch and concurrency measured here, as
bench/results/serving.run.md states it. Against it, ``robustgate serve`` with dynamic batching on
(max batch 64, 2 ms), in two pipelines -- no defense stages (``onnx``, the same comparison as
serving.run.md), deploy/default.yaml without its stateful stage (``magnet``: MagNet fused into the
backbone's session) and the shipped default (``default``: MagNet and the k-NN stateful stage) -- each
with ``server.workers`` from ``--workers`` (1 and 2 by default), under a
closed-loop grpc.aio client in this process (or ``--procs`` client processes, for a machine with
more cores than one client process can load) sending batch-1 raw FP32 calls over ``--channels``
connections of their own (one connection stays on one worker). Per point: items/s, latency
percentiles, the server's CPU cores (supervisor and workers together) and items/s as a share of
the ceiling.

    .venv/bin/python bench/serving/workers.py --out serving.workers
    # a machine with 16 cores (bench/gpu/check.sh's part serving_workers):
    python bench/serving/workers.py --workers 1,4,8 --procs 6 --channels 24 --calls 12000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "hardening"))
import common  # noqa: E402  (bench/ is not a package)
import loadgen  # noqa: E402
from rpc_floor import tree_cpu_s  # noqa: E402

from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_YAML = common.REPO / "deploy" / "default.yaml"
SHIPPED_STAGES = yaml.safe_load(DEFAULT_YAML.read_text())["pipeline"]["stages"]
PIPELINES = {  # name -> (config file, overrides)
    "onnx": (None, {"bundle": "bundles/default"}),
    # deploy/default.yaml without its stateful stage: MagNet fused into the backbone's session
    "magnet": (DEFAULT_YAML, {"pipeline": {"stages": [s for s in SHIPPED_STAGES if s["kind"] != "stateful"]}}),
    # as it ships: MagNet and the k-NN stateful stage (bundles/default's fitted encoder); with 2 workers its
    # histories are the supervisor's store service's (defenses/stateful/remote.py), with 1 in process
    "default": (DEFAULT_YAML, {}),
}
PIPELINE_NOTES = {
    "onnx": "no defense stage (bundles/default)",
    "magnet": "deploy/default.yaml without its stateful stage (MagNet fused into the backbone's session)",
    "default": "deploy/default.yaml (MagNet and the k-NN stateful stage, answers the label); with 1 worker the "
               "stage's histories are in the process, with 2 in the supervisor's store service, shared by the workers",
}
BATCHING = {"enabled": True, "max_batch_size": 64, "max_queue_delay_ms": 2}
RAW_POINTS = ((1, 1), (1, 16), (8, 1), (8, 4), (32, 1), (64, 1))  # (batch, concurrency)
TARGET_FRACTION = 0.40  # issue 25: batch-1 throughput >= 40% of the ceiling at concurrency 64


class Stream:
    """Benign clients' streams (``--inputs stream``): connection ``c`` is client ``bench-{first + c}``
    (its ``x-client-id``) of ``total`` and sends the next image of its own slice of ``pool``
    (serialized requests) with every call, continuing where it stopped at the last point, so that a
    stateful stage searches its history for every query instead of taking a retry. ``first`` and
    ``total``: the client processes (``--procs``) share the clients out."""

    def __init__(self, pool: list[bytes], channels: int, first: int = 0, total: int | None = None):
        self.pool, self.first = pool, first
        per = len(pool) // (total or channels)
        self.next = [(first + c) * per for c in range(channels)]

    def request(self, c: int) -> tuple[bytes, tuple]:
        self.next[c] += 1
        return self.pool[self.next[c] % len(self.pool)], (("x-client-id", f"bench-{self.first + c}"),)


async def closed_loop(url: str, request, calls: int, concurrency: int, pid: int, channels: int,
                      stream: Stream | None = None, start=None) -> dict:
    """``calls`` batch-1 calls, ``concurrency`` in flight over ``channels`` connections of their own.
    ``start``: a client process's barrier (``--procs``), passed once warm; then the result carries
    the raw latencies and the window's wall-clock ends, and the caller measures the server's CPU."""
    opened = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in opened]
        raw = [ch.unary_unary(loadgen.MODEL_INFER_METHOD, request_serializer=None,
                              response_deserializer=pb.ModelInferResponse.FromString) for ch in opened]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        turn = [0]

        async def one(record: bool) -> None:
            turn[0] += 1
            c = turn[0] % channels
            t0 = time.perf_counter()
            try:
                if stream is None:
                    await stubs[c].ModelInfer(request, timeout=60)
                else:
                    body, identity = stream.request(c)
                    await raw[c](body, timeout=60, metadata=identity)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                return
            if record:
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(False) for _ in range(max(concurrency, 20 * channels))))  # warm-up
        if start is not None:
            await asyncio.get_running_loop().run_in_executor(None, start.wait)
        slots = asyncio.Semaphore(concurrency)

        async def limited() -> None:
            async with slots:
                await one(True)

        cpu0, t0, w0 = (tree_cpu_s(pid) if start is None else 0.0), time.perf_counter(), time.time()
        await asyncio.gather(*(limited() for _ in range(calls)))
        wall, cpu, w1 = time.perf_counter() - t0, (tree_cpu_s(pid) - cpu0 if start is None else 0.0), time.time()
    finally:
        for ch in opened:
            await ch.close()
    if start is not None:
        return {"latencies": latencies, "errors": errors, "window": (w0, w1)}
    return summary(latencies, errors, wall, cpu)


def summary(latencies: list[float], errors: dict[str, int], wall: float, cpu: float) -> dict:
    lat = np.asarray(latencies) * 1e3
    return {"items_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "server_cores": cpu / wall, "errors": errors}


def _client_process(url: str, body: bytes, calls: int, concurrency: int, channels: int, pool: list[bytes] | None,
                    first: int, total: int, start, results) -> None:
    """One of ``--procs`` client processes (spawned): its share of the calls, in flight and connections."""
    stream = None if pool is None else Stream(pool, channels, first, total)
    results.put(asyncio.run(closed_loop(url, pb.ModelInferRequest.FromString(body), calls, concurrency, 0, channels,
                                        stream, start)))


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal shares."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def multi_process_loop(url: str, request, calls: int, concurrency: int, pid: int, channels: int, procs: int,
                       pool: list[bytes] | None) -> dict:
    """The closed loop from ``procs`` spawned client processes at once (one Python process cannot load
    a server of many workers): each warms up, then all start together at a barrier; items/s over the
    union of their windows, the server's CPU over the same span."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(procs + 1), ctx.Queue()
    chans = [max(1, c) for c in spread(channels, procs)]
    firsts = [sum(chans[:i]) for i in range(procs)]
    ps = [ctx.Process(target=_client_process, args=(url, request.SerializeToString(), n, c, ch, pool, f, sum(chans),
                                                    start, results), daemon=True)
          for n, c, ch, f in zip(spread(calls, procs), spread(concurrency, procs), chans, firsts)]
    for p in ps:
        p.start()
    try:
        start.wait(timeout=300)
        cpu0, t0 = tree_cpu_s(pid), time.time()
        got = [results.get(timeout=600) for _ in ps]
        cpu = tree_cpu_s(pid) - cpu0
    finally:
        for p in ps:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    wall = max(r["window"][1] for r in got) - min(t0, *(r["window"][0] for r in got))
    errors: dict[str, int] = {}
    for r in got:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return summary([v for r in got for v in r["latencies"]], errors, wall, cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4000, help="measured calls per point")
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--procs", type=int, default=1,
                    help="client processes sharing the calls, in flight and connections (1: this process)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--pipelines", default="onnx,default", help=f"of {', '.join(PIPELINES)}")
    ap.add_argument("--inputs", choices=("fixed", "stream"), default="fixed",
                    help="fixed: one test image sent over and over; stream: benign clients' streams (Stream)")
    ap.add_argument("--out", default="serving.workers")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), common.loadavg()
    x, _ = common.test_images(1)  # [1, 1, 28, 28]

    raw = []
    onnx_file = str(common.REPO / "bundles" / "default" / "backbone.onnx")
    for batch, conc in RAW_POINTS:
        r = loadgen.run_raw_ort(onnx_file, "input", (1, 28, 28), conc, batch=batch, warmup_s=0.5, duration_s=2.0)
        raw.append({"batch": batch, "concurrency": conc, "items_per_s": r["items_per_s"], "p50_ms": r["p50_ms"]})
    ceiling = max(raw, key=lambda r: r["items_per_s"])

    rows = []
    pipelines = {name: PIPELINES[name] for name in args.pipelines.split(",")}
    pool = common.test_images(10_000)[0] if args.inputs == "stream" else None  # the whole test set, shuffled
    encoded: dict[str, list[bytes]] = {}  # model name -> the pool's serialized requests (once, not per server)
    for name, (config, overrides) in pipelines.items():
        for workers in [int(w) for w in args.workers.split(",")]:
            server = common.Serve(config, overrides={**overrides, "batching": BATCHING, "server": {"workers": workers}})
            try:
                request = common.infer_request(server.model, x)
                if pool is not None and server.model not in encoded:
                    encoded[server.model] = [loadgen.encode_request(item[None], "input", server.model, "")
                                             for item in pool]
                stream = None if pool is None else Stream(encoded[server.model], args.channels)
                for conc in concurrencies:
                    if args.procs > 1:
                        r = multi_process_loop(server.url, request, args.calls, conc, server.pid, args.channels,
                                               args.procs, None if pool is None else encoded[server.model])
                    else:
                        r = asyncio.run(closed_loop(server.url, request, args.calls, conc, server.pid, args.channels,
                                                    stream))
                    rows.append({"pipeline": name, "workers": workers, "concurrency": conc, **r,
                                 "of_ceiling": r["items_per_s"] / ceiling["items_per_s"]})
                    print(rows[-1], flush=True)
            finally:
                server.stop()

    def point(pipeline: str, workers: int, conc: int) -> dict | None:
        return next((r for r in rows if (r["pipeline"], r["workers"], r["concurrency"]) == (pipeline, workers, conc)), None)

    data = {"command": " ".join(["python", "bench/serving/workers.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": started, "load_average_start": load_start, "load_average_end": common.loadavg(),
            "machine": common.machine(), "calls": args.calls, "channels": args.channels, "procs": args.procs,
            "inputs": args.inputs,
            "raw": raw, "ceiling": ceiling,
            "rows": rows}
    counts = sorted({r["workers"] for r in rows})
    lines = [f"# Serving with server.workers {', '.join(map(str, counts))} against the raw ONNX Runtime ceiling", "",
             f"- Command: `{data['command']}`",
             f"- Started {started}; load average at start {load_start}, at end {data['load_average_end']} "
             f"({os.cpu_count()} cores, **shared with other jobs and with this client**: compare rows within this run"
             + ("; with 2 cores two workers and the client contend for the same cores)" if os.cpu_count() <= 2
                else ")"),
             f"- {args.calls} batch-1 calls per point over {args.channels} connections"
             + (f" from {args.procs} client processes" if args.procs > 1 else "")
             + "; batching on (max batch 64, 2 ms)",
             "- Requests: " + ("one test image sent over and over" if args.inputs == "fixed" else
                               "benign clients' streams: each connection its own client (`x-client-id`), a new test "
                               "image with every call (a stateful stage searches its history for each)"),
             "- Pipelines: " + "; ".join(f"`{n}` " + PIPELINE_NOTES[n] for n in pipelines),
             "", "## Raw ONNX Runtime (the ceiling), bundles/default backbone", "",
             "| batch | concurrency | items/s | p50 ms |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['concurrency']} | {r['items_per_s']:,.0f} | {r['p50_ms']:.3f} |" for r in raw]
    lines += ["", f"Ceiling: {ceiling['items_per_s']:,.0f} items/s (batch {ceiling['batch']}, concurrency "
              f"{ceiling['concurrency']}).", "", "## robustgate serve, batch-1 calls", "",
              "| pipeline | workers | concurrency | items/s | of the ceiling | p50 ms | p99 ms | server cores | errors |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(f"| {r['pipeline']} | {r['workers']} | {r['concurrency']} | {r['items_per_s']:,.0f} | "
                     f"{r['of_ceiling']:.0%} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cores']:.2f} | {errors} |")
    lines += ["", "## Target (issue 25)", ""]
    c = max(concurrencies)
    for name in pipelines:
        best = max((r for r in rows if r["pipeline"] == name and r["concurrency"] == c), key=lambda r: r["items_per_s"],
                   default=None)
        if best is not None:
            met = "met" if best["of_ceiling"] >= TARGET_FRACTION else "not met"
            lines.append(f"- {name}: batch-1 throughput at concurrency {c} >= {TARGET_FRACTION:.0%} of the ceiling: "
                         f"{best['of_ceiling']:.0%} ({best['items_per_s']:,.0f} items/s, {best['workers']} workers): {met}")
    for name in pipelines:
        one = point(name, 1, c)
        for n in counts[1:]:
            more = point(name, n, c)
            if one and more:
                lines.append(f"- {name}: {n} workers / 1 worker at concurrency {c}: "
                             f"{more['items_per_s'] / one['items_per_s']:.2f}x")
    lines.append("")
    js, md = common.write_results(args.out, data, "\n".join(lines), args.out_dir)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
