"""Closed-loop Open Inference Protocol load generator (grpc.aio) and the raw ONNX Runtime ceiling.

``run_load``: ``concurrency`` workers share one channel; each sends a ModelInfer, waits for the
answer and sends the next (closed loop, like perf_analyzer's ``--concurrency-range``). Requests
carry ``batch`` items as raw FP32 (what tritonclient and perf_analyzer send). Latency is measured
per request from send to answer; only requests that start after ``warmup_s`` and end within the
measurement window count; throughput = counted requests x batch / window.

``run_raw_ort``: the same loop against an in-process ``onnxruntime.InferenceSession`` from
``concurrency`` threads (ONNX Runtime releases the GIL) -- no protocol, no server: the ceiling.

Written here rather than with a library because perf_analyzer (the standard tool) needs Triton's
ModelConfig RPC, which is not part of the Open Inference Protocol and which MLServer does not serve
(see README); this client measures every target the same way, MLServer included.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from typing import Callable

import grpc
import numpy as np
import onnxruntime as ort

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc
from robustgate.proxy.backends.upstream import MODEL_INFER_METHOD, encode_request


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_share(before: dict[str, float], after: dict[str, float], window_s: float) -> dict[str, float]:
    """CPU cores each probed process used on average during the window (1.0 = one full core)."""
    return {k: (after[k] - before[k]) / window_s for k in before}


def summarize(latencies_s: list[float], items: int, window_s: float, errors: Counter) -> dict:
    lat_ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    out = {
        "requests": int(lat_ms.size),
        "items_per_s": items / window_s if window_s > 0 else 0.0,
        "requests_per_s": lat_ms.size / window_s if window_s > 0 else 0.0,
        "window_s": window_s,
        "errors": dict(errors),
    }
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = float(np.percentile(lat_ms, q)) if lat_ms.size else None
    out["mean_ms"] = float(lat_ms.mean()) if lat_ms.size else None
    return out


def make_request(model: str, input_name: str, x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return req


def stream_request(model: str, input_name: str, pool: np.ndarray, k: int, batch: int) -> bytes:
    """Request ``k`` of a stream over ``pool`` ``[M, *item_shape]``: items ``k*batch ..`` (wrapping),
    serialized (the proxy's own encoder: one copy of the pixels)."""
    idx = (k * batch + np.arange(batch)) % len(pool)
    return encode_request(pool[idx], input_name, model, "")


async def _load(url: str, req: pb.ModelInferRequest, batch: int, concurrency: int, warmup_s: float,
                duration_s: float, timeout_s: float, probes: dict[str, Callable[[], float]],
                pool: np.ndarray | None = None, model: str = "", input_name: str = "",
                clients: int | None = None) -> dict:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        infer_bytes = channel.unary_unary(MODEL_INFER_METHOD, request_serializer=None,
                                          response_deserializer=pb.ModelInferResponse.FromString)
        first = await stub.ModelInfer(req, timeout=timeout_s)  # fails loudly if the target cannot answer
        if not first.outputs:
            raise RuntimeError(f"{url}: ModelInfer answered without outputs")
        start = time.perf_counter()
        t_open, t_close = start + warmup_s, start + warmup_s + duration_s
        latencies: list[float] = []
        errors: Counter = Counter()

        async def worker(i: int) -> None:
            # a stream: closed-loop client i walks its own part of the pool, one new request each time, as
            # identity i mod `clients` (its x-client-id; several requests of one identity in flight when fewer)
            k = i * (len(pool) // batch) // concurrency if pool is not None else 0
            identity = (("x-client-id", f"loadgen-{i % (clients or concurrency)}"),)
            while True:
                t0 = time.perf_counter()
                if t0 >= t_close:
                    return
                try:
                    if pool is None:
                        await stub.ModelInfer(req, timeout=timeout_s)
                    else:
                        k += 1
                        await infer_bytes(stream_request(model, input_name, pool, k, batch), timeout=timeout_s,
                                          metadata=identity)
                except grpc.aio.AioRpcError as exc:
                    if t0 >= t_open:
                        errors[exc.code().name] += 1
                    continue
                t1 = time.perf_counter()
                if t0 >= t_open and t1 <= t_close:
                    latencies.append(t1 - t0)

        cpu: list[dict[str, float]] = []

        async def sample() -> None:  # CPU use of client and servers inside the measured window only
            for t in (t_open, t_close):
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                cpu.append({k: f() for k, f in probes.items()})

        await asyncio.gather(sample(), *(worker(i) for i in range(concurrency)))
    out = summarize(latencies, len(latencies) * batch, duration_s, errors)
    out["cpu_cores"] = cpu_share(cpu[0], cpu[1], duration_s)
    return out


def run_load(url: str, model: str, input_name: str, item_shape: tuple[int, ...], concurrency: int, batch: int = 1,
             warmup_s: float = 1.0, duration_s: float = 5.0, timeout_s: float = 30.0, seed: int = 0,
             server_pids: dict[str, int] | None = None, x: np.ndarray | None = None,
             pool: np.ndarray | None = None, clients: int | None = None) -> dict:
    """Closed-loop load on ``url`` (host:port); returns throughput, latency percentiles and the CPU
    cores used by this client and by each of ``server_pids`` during the measured window.

    Every request carries ``x`` ``[batch, *item_shape]`` when given, else uniform noise in [0, 1)
    drawn with ``seed`` -- the same payload each time, which a stateful stage takes for retries.
    ``pool`` ``[M, *item_shape]`` instead: benign clients' streams, each closed-loop client its own
    identity (the ``x-client-id`` header) sending the next ``batch`` images of its own part of the
    pool with every request (wrapping around after ``M / concurrency`` items); ``clients`` (< concurrency)
    identities instead: closed-loop client ``i`` is identity ``i mod clients``, so each identity has
    several requests in flight (a client with concurrent calls, a gateway)."""
    if not url.startswith(("127.", "localhost:", "[::1]:")):
        raise ValueError(f"{url}: the benchmark only sends traffic to loopback addresses")
    if x is None:
        x = np.random.default_rng(seed).random((batch, *item_shape), dtype=np.float32)  # [B, C, H, W] in [0, 1)
    elif x.shape != (batch, *item_shape):
        raise ValueError(f"payload of shape {x.shape}, expected {(batch, *item_shape)}")
    req = make_request(model, input_name, x)
    probes: dict[str, Callable[[], float]] = {"client": time.process_time}
    for name, pid in (server_pids or {}).items():
        probes[name] = lambda pid=pid: process_cpu_s(pid)
    if pool is not None and (pool.shape[1:] != tuple(item_shape) or len(pool) < batch * concurrency):
        raise ValueError(f"pool of shape {pool.shape}: expected [M >= {batch * concurrency}, {', '.join(map(str, item_shape))}]")
    if clients is not None and not 1 <= clients <= concurrency:
        raise ValueError(f"clients must be within 1..concurrency ({concurrency}), got {clients}")
    return asyncio.run(_load(url, req, batch, concurrency, warmup_s, duration_s, timeout_s, probes, pool, model,
                             input_name, clients))


def run_raw_ort(onnx_file: str, input_name: str, item_shape: tuple[int, ...], concurrency: int, batch: int = 1,
                warmup_s: float = 1.0, duration_s: float = 5.0, intra_op_threads: int = 0, seed: int = 0,
                session_config: dict[str, str] | None = None) -> dict:
    """The same closed loop on an in-process ONNX Runtime session shared by ``concurrency`` threads.
    ``session_config``: session config entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    sess = ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).random((batch, *item_shape), dtype=np.float32)  # [B, C, H, W]
    sess.run(None, {input_name: x})
    start = time.perf_counter()
    t_open, t_close = start + warmup_s, start + warmup_s + duration_s
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]

    def worker(out: list[float]) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_close:
                return
            sess.run(None, {input_name: x})
            t1 = time.perf_counter()
            if t0 >= t_open and t1 <= t_close:
                out.append(t1 - t0)

    threads = [threading.Thread(target=worker, args=(per_thread[i],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_open - time.perf_counter()))
    cpu0 = time.process_time()
    time.sleep(max(0.0, t_close - time.perf_counter()))
    cpu1 = time.process_time()
    for t in threads:
        t.join()
    latencies = [v for lst in per_thread for v in lst]
    out = summarize(latencies, len(latencies) * batch, duration_s, Counter())
    out["cpu_cores"] = {"process": (cpu1 - cpu0) / duration_s}
    return out
