"""The proxy on a device, under load: maximum throughput and the p99 latency at half of it.

    python bench/gpu/serve_load.py --preset default|diffusion [--device cuda] [--batch 64] \\
        [--concurrency 32,128] [--procs 8] [--duration 5] [--warmup 1] [--set KEY=YAML ...] \\
        --out bench/results/gpu.serve_default

Starts a real ``robustgate serve`` (a subprocess, on loopback) with the bundle's torch twin as the
backend (``backend.kind: torch``) and every stage on ``--device``:

- ``default``: deploy/default.yaml's stages with ``runtime: torch`` (the ONNX runtime
  would keep MagNet on the host; the torch backend has no fused ONNX pass, so MagNet runs as its
  own torch stage on the device), less its stateful stage: a per-client history searched on the
  host, whose cost is measured apart (bench/results/defenses.proxy_cost.stateful.md), and which
  this load (the same test images from a few client processes) would only see as retries;
- ``diffusion``: the bundle's fitted diffusion purifier (``bundles/default``: ``diffusion``,
  t* = 100, 2 DDIM steps) with ``runtime: torch``, action ``log``.

``verdict_mode: item`` so that a rejected item does not turn its request into an error (the work
done is the same); batching merges requests up to ``batching.max_batch_size`` (1,024 on cuda).

Load: Fashion-MNIST test images in requests of ``--batch`` items, sent by ``--procs`` client
processes (grpc.aio each; one Python process alone cannot fill a GPU-backed proxy).
1. closed loop at each total ``--concurrency``: items/s over ``--duration`` s after ``--warmup`` s;
   the maximum over the levels is the throughput;
2. open loop at half that request rate (requests sent on a fixed schedule whatever the answers):
   p50 / p99 end-to-end latency from send to answer.
Results: OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, command_line, machine, write  # noqa: E402

PRESETS = ("default", "diffusion")


def config_for(preset: str, device: str, bundle: Path, overrides: list[str]) -> dict:
    """The served config: deploy/default.yaml with the torch backend and every stage on ``device``."""
    cfg = yaml.safe_load((REPO / "deploy" / "default.yaml").read_text())
    cfg["bundle"] = str(bundle)
    cfg["server"] = {**cfg.get("server", {}), "host": "127.0.0.1", "port": 0, "metrics_port": 0,
                     "metrics_host": "127.0.0.1", "grace_s": 2, "workers": 1}  # one process batches for the device
    cfg["backend"] = {"kind": "torch", "torch": {"device": device}}
    if preset == "default":
        stages = [{**s, "params": {**s.get("params", {}), "runtime": "torch"}} for s in cfg["pipeline"]["stages"]
                  if s["kind"] != "stateful"]
    elif preset == "diffusion":
        stages = [{"name": "diffusion", "kind": "diffusion", "action": "log", "params": {"runtime": "torch"}}]
    else:
        raise ValueError(f"--preset must be one of {PRESETS}")
    cfg["pipeline"] = {**cfg["pipeline"], "stages": stages, "device": device, "verdict_mode": "item"}
    cfg["batching"] = {"enabled": True, "max_batch_size": 1024 if device == "cuda" else 64, "max_queue_delay_ms": 1,
                       "max_queue_items": 65536, "max_queue_wait_ms": None}
    for item in overrides:  # dotted.key=YAML value
        key, _, value = item.partition("=")
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return cfg


class Server:
    """``robustgate serve --config`` in a subprocess; ``port`` / ``metrics_port`` from its banner."""

    def __init__(self, cfg: dict, log_path: Path, start_timeout_s: float = 180.0):
        self.cfg_file = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump(cfg, self.cfg_file)
        self.cfg_file.close()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "robustgate.proxy.cli", "serve", "--config",
                                      self.cfg_file.name], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=REPO)
        deadline = time.monotonic() + start_timeout_s
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError(f"robustgate serve exited with {self.proc.returncode} before serving; see {log_path}:\n"
                                   + Path(log_path).read_text()[-3000:])
            m = re.search(r"on port (\d+), metrics on port (\d+)", line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"robustgate serve did not start within {start_timeout_s} s")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.cfg_file.name)


# ---- client processes ------------------------------------------------------------------------------
async def _client(url: str, req_bytes: bytes, mode: str, level: float, warmup_s: float, duration_s: float,
                  timeout_s: float) -> dict:
    import grpc

    from robustgate.protos import open_inference_grpc_pb2 as pb
    from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest.FromString(req_bytes)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(req, timeout=timeout_s)  # fails loudly when the target cannot answer
        start = time.perf_counter()
        t_open, t_close = start + warmup_s, start + warmup_s + duration_s

        async def one(t0: float) -> None:
            try:
                await stub.ModelInfer(req, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if t0 >= t_open:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                return
            t1 = time.perf_counter()
            if t0 >= t_open and t1 <= t_close:
                latencies.append(t1 - t0)

        if mode == "closed":  # ``level`` workers, each sends the next request when the last is answered
            async def worker() -> None:
                while (t0 := time.perf_counter()) < t_close:
                    await one(t0)

            await asyncio.gather(*(worker() for _ in range(int(level))))
        else:  # open loop at ``level`` requests/s: sent on schedule whatever the answers
            tasks, period, k = [], 1.0 / level, 0
            while True:
                due = start + k * period
                if due >= t_close:
                    break
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.ensure_future(one(time.perf_counter())))
                k += 1
            await asyncio.gather(*tasks)
    return {"latencies": latencies, "errors": errors}


def _client_main(args: tuple) -> dict:
    return asyncio.run(_client(*args))


def load(url: str, req_bytes: bytes, mode: str, total: float, procs: int, warmup_s: float, duration_s: float,
         batch: int, timeout_s: float = 30.0) -> dict:
    """``total`` closed-loop workers or requests/s, split over ``procs`` client processes."""
    procs = max(1, min(procs, int(total))) if mode == "closed" else procs
    share = [total // procs + (1 if i < total % procs else 0) for i in range(procs)] if mode == "closed" \
        else [total / procs] * procs
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_client_main, [(url, req_bytes, mode, s, warmup_s, duration_s, timeout_s) for s in share if s > 0])
    lat = np.sort(np.concatenate([np.asarray(p["latencies"]) for p in parts])) if parts else np.zeros(0)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    q = (lambda p: float(np.quantile(lat, p) * 1000)) if lat.size else (lambda p: None)
    return {"mode": mode, "level": total, "client_procs": len(parts), "requests": int(lat.size),
            "requests_per_s": lat.size / duration_s, "items_per_s": lat.size * batch / duration_s,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESETS, default="default")
    ap.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=64, help="items per request")
    ap.add_argument("--concurrency", default="32,128", help="total closed-loop workers, comma-separated levels")
    ap.add_argument("--procs", type=int, default=8, help="client processes")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="config override (dotted key)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from robustgate.models.bundle import Bundle
    from robustgate.models.data import bundle_splits
    from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: F401  (fails here, not in the clients)

    sys.path.insert(0, str(REPO / "bench" / "serving"))
    from loadgen import make_request

    bundle = Bundle.load(args.bundle)
    x, _ = bundle_splits(bundle).take("test", args.batch)
    cfg = config_for(args.preset, args.device, args.bundle.resolve(), args.set)
    req_bytes = make_request(bundle.name, bundle.input.name, x.numpy().astype(np.float32)).SerializeToString()
    log_path = args.out.parent / (args.out.name + ".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    server = Server(cfg, log_path)
    started_s = time.perf_counter() - t_start
    try:
        url = f"127.0.0.1:{server.port}"
        closed = []
        for level in [int(c) for c in args.concurrency.split(",")]:
            r = load(url, req_bytes, "closed", level, args.procs, args.warmup, args.duration, args.batch)
            closed.append(r)
            print(f"closed loop, {level} workers: {r['items_per_s']:,.0f} items/s, p99 {r['p99_ms']} ms, "
                  f"errors {r['errors']}", flush=True)
        best = max(closed, key=lambda r: r["items_per_s"])
        half_rps = best["requests_per_s"] / 2
        half = load(url, req_bytes, "open", half_rps, args.procs, args.warmup, args.duration, args.batch) \
            if half_rps > 0 else None
        if half:
            print(f"open loop at {half_rps:,.1f} requests/s: {half['items_per_s']:,.0f} items/s, "
                  f"p50 {half['p50_ms']} ms, p99 {half['p99_ms']} ms, errors {half['errors']}", flush=True)
        metrics = server.metrics()
    finally:
        server.stop()
    info = next((line for line in metrics.splitlines() if line.startswith("robustgate_backend_info{")), None)
    batches = {m.group(1): float(m.group(2)) for m in re.finditer(r"^robustgate_batch_size_(sum|count) (\S+)$", metrics, re.M)}
    result = {
        "preset": args.preset, "device": args.device, "batch": args.batch, "config": cfg, "command": command_line(),
        "machine": machine(args.device), "server_start_s": started_s, "backend_info": info,
        "mean_executed_batch": batches.get("sum", 0) / batches["count"] if batches.get("count") else None,
        "closed_loop": closed, "max_items_per_s": best["items_per_s"], "half_load_open_loop": half,
    }
    lines = [f"# Proxy on {args.device}: preset `{args.preset}`, requests of {args.batch} items", "",
             f"`{result['command']}`  ", f"machine: {result['machine']}  ", f"backend: `{info}`  ",
             f"stages: `{cfg['pipeline']['stages']}`  ", f"batching: `{cfg['batching']}`  ",
             f"mean executed batch: {result['mean_executed_batch']}", "",
             "| load | level | client procs | items/s | requests/s | p50 ms | p99 ms | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in closed + ([half] if half else []):
        level = f"{r['level']} workers" if r["mode"] == "closed" else f"{r['level']:.1f} req/s"
        lines.append(f"| {r['mode']} loop | {level} | {r['client_procs']} | {r['items_per_s']:,.0f} | "
                     f"{r['requests_per_s']:,.1f} | {r['p50_ms'] and round(r['p50_ms'], 2)} | "
                     f"{r['p99_ms'] and round(r['p99_ms'], 2)} | {r['errors'] or ''} |")
    write(args.out, result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
