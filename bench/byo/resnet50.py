"""Bring your own classifier at a realistic size (issue 21, Benchmark): a torchvision ResNet-50
(3x224x224, random weights -- throughput does not depend on them; nothing is downloaded) exported
to ONNX with a dynamic batch axis, imported with ``robustgate import``, and served:

- the proxy in-process (ONNX Runtime backend, no stages) vs raw in-process ONNX Runtime (no
  transport at all) and, the fair reference, vs a bare grpc.aio V2 server running the same session
  (bench/serving/bare_v2.py: the gRPC round trip of a 600 KB request without the proxy's work);
  beside them raw ONNX Runtime with the proxy's session options (its threads do not spin) and the
  proxy with ``backend.onnxruntime.spinning: run`` and with ``server.compute_nice: 0``, which split
  the proxy's added p50 into transport, session options, thread priority and the proxy's own work;
- the proxy in front of Seldon MLServer (``backend.kind: upstream``) vs MLServer called directly;

p50 latency at concurrency 1 and throughput at concurrency 16 (batch-1 requests; targets: the
proxy adds <= 5% to p50 and costs <= 5% throughput); then JPEG, median and a MagNet detector
fitted at 224x224 (``robustgate fit --defense magnet`` on Fashion-MNIST conformed to 3x224x224,
small: how well it is fitted does not change its cost; its default ``arch: auto`` is autoencoder IV
at this size) each in the in-process proxy, target <= 10% of its no-stage throughput -- MagNet as
the proxy serves a stage that names no runtime (ONNX Runtime fused into the backbone's session,
``magnet``) and, without a target, in torch (``runtime: torch``, ``magnet_torch``); and UINT8
requests (0..255, scaled by 1/255 by the proxy). The k-NN stateful stage (fitted small the same way: its
encoder's cost does not depend on its training) on benign clients' streams (``STREAM_STAGES``), against the
no-stage proxy on the same streams: issue 22's cost line on a realistic model.

Reuses bench/serving/run.py's machine description, proxy launcher and MLServer harness and
bench/serving/loadgen.py's closed-loop client. Writes bench/results/byo.resnet50.json + .md.

    nice -n 10 python bench/byo/resnet50.py [--duration 15] [--warmup 3] [--points REGEX]

``--points``: only the points whose name matches (a short check; only the servers they need start,
and only the checks whose points were measured are written).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


serving = _load("robustgate_bench_serving_run", REPO / "bench" / "serving" / "run.py")  # puts loadgen on sys.path
import loadgen  # noqa: E402  (bench/serving/loadgen.py)

from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.proxy.backends.onnx import SPINNING_CONFIG  # noqa: E402

SHAPE = (3, 224, 224)
MODEL = "resnet50"
TARGET_PROXY_P50 = 0.05  # the proxy adds at most 5% to p50 at concurrency 1
TARGET_PROXY_THROUGHPUT = 0.05  # and costs at most 5% of the throughput at concurrency 16
TARGET_STAGE_THROUGHPUT = 0.10  # each stage costs at most 10% of the no-stage throughput
STAGES = {
    "jpeg": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 75}}],
    "median": [{"name": "median", "kind": "median", "params": {"kernel_size": 3}}],
    # as the proxy serves a MagNet stage that names no runtime (MagNet.served_runtime): ONNX Runtime,
    # the score graph fused into the backbone's session (proxy/backends/fuse.py)
    "magnet": [{"name": "magnet", "kind": "magnet", "action": "reject"}],
    # the torch runtime (the red team's twin; what a stage gets with runtime: torch): no target
    "magnet_torch": [{"name": "magnet", "kind": "magnet", "action": "reject", "params": {"runtime": "torch"}}],
}
UNTARGETED_STAGES = {"magnet_torch"}
# stages measured on benign clients' streams (``loadgen.run_load(pool=...)``: each closed-loop client its own
# identity, a new image with every request) against the no-stage proxy on the same streams: a stateful stage
# takes the fixed payload of the other points for exact retries and would never search its history. The
# k-NN stage (issue 22: <= 10% of proxy throughput at concurrency 16) as deploy/default.yaml documents it,
# action log so that no benign client's block changes the load
STREAM_STAGES = {
    "stateful_knn": [{"name": "stateful", "kind": "stateful", "action": "log"}],
}
STREAM_IMAGES = 2048  # the streams' pool: 128 distinct images per client at concurrency 16 (~110 requests
# per client over 3 rounds of 15 s + warm-up at ~33 items/s), Fashion-MNIST test images conformed to 3x224x224


BATCHING = {"max_batch_size": 16}  # concurrency 16 of batch-1 requests never coalesces more


BIG_MESSAGE = 64 << 20  # MLServer's and the proxy's upstream request limit here (the proxy's own server limit)


class BigMessages(serving.harness.MLServerProcess):
    """The test harness's MLServer with gRPC messages up to 64 MiB (the proxy's own limit): at
    3x224x224 FP32 (588 KiB an item) MLServer's 4 MiB default takes 6 items per request, and the
    proxy would send a coalesced batch of 16 as 3 requests (``backend.upstream.max_request_bytes``);
    raised, so that one batch is one request, as measured before that split existed."""

    def _write_settings(self) -> None:
        super()._write_settings()
        path = self.workdir / "settings.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "grpc_max_message_length": BIG_MESSAGE}, indent=2))


class BareServer:
    """bench/serving/bare_v2.py as a subprocess on a free 127.0.0.1 port (ONNX Runtime's default
    session options, as the raw reference's)."""

    def __init__(self, workdir: Path, onnx_file: str, model: str):
        self.port = serving.harness.free_port()
        self.log = workdir / f"bare-{self.port}.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "serving" / "bare_v2.py"), "--onnx",
                                          onnx_file, "--port", str(self.port), "--model", model],
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        serving.wait_ready(self.url, model, self.proc, self.log)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def export_resnet50(path: Path) -> None:
    """torchvision ResNet-50, random seeded weights, ``input`` [N, 3, 224, 224] -> ``logits`` [N, 1000]."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(net, (torch.rand(2, *SHAPE),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


@functools.cache
def stream_pool() -> np.ndarray:
    """``[STREAM_IMAGES, 3, 224, 224]`` float32: the first Fashion-MNIST test images conformed to ``SHAPE``
    (robustgate.models.data.conform: 1 -> 3 channels, antialiased resize), the benign streams' pictures."""
    from robustgate.models.data import conform, load_splits

    x = load_splits("fashion-mnist").test_x[:STREAM_IMAGES]  # [M, 1, 28, 28]
    return np.ascontiguousarray(conform(x, SHAPE).numpy(), dtype=np.float32)


def robustgate(args: list[str], log) -> str:
    cmd = [sys.executable, "-m", "robustgate.proxy.cli", *args]
    log("+ robustgate " + " ".join(args))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return f"robustgate {' '.join(args)}  ({time.perf_counter() - t0:.0f} s)"


def uint8_load(url: str, concurrency: int, warmup: float, duration: float, pids: dict[str, int]) -> dict:
    """loadgen's closed loop with a UINT8 payload (what camera pipelines send; the proxy scales by 1/255)."""
    x = np.random.default_rng(0).integers(0, 256, size=(1, *SHAPE), dtype=np.uint8)  # [1, 3, 224, 224]
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype="UINT8", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    probes = {"client": time.process_time, **{k: (lambda p=p: loadgen.process_cpu_s(p)) for k, p in pids.items()}}
    return asyncio.run(loadgen._load(url, req, 1, concurrency, warmup, duration, 60.0, probes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per point and round")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all points (medians reported)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default="byo.resnet50")
    p.add_argument("--points", default=None, metavar="REGEX", help="only the points whose name matches (re.search)")
    args = p.parse_args(argv)
    wanted = (lambda name: True) if args.points is None else (lambda name: re.search(args.points, name) is not None)  # noqa: E731
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="robustgate-byo-r50-"))
    onnx_file, bundle = work / "resnet50.onnx", work / "bundle"
    res: dict = {
        "command": "python bench/byo/resnet50.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": serving.machine(),
        "load_average_start": serving.loadavg(),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds, "input": list(SHAPE),
                     "client": "bench/serving/loadgen.py (grpc.aio closed loop, batch-1 requests, raw contents)",
                     "proxy": "robustgate serve (bench/serving/run.py Proxy: batching on, max_batch_size 16, 2 ms)",
                     "mlserver": "tests/proxy/upstream/mlserver_onnx.py, parallel_workers 0, grpc_max_message_length "
                                 "64 MiB (its 4 MiB default refuses a coalesced batch of 7+ items at 224x224)"},
        "steps": [], "points": {},
    }
    log("exporting torchvision resnet50(weights=None)")
    export_resnet50(onnx_file)
    res["steps"].append(robustgate(["import", "--onnx", str(onnx_file), "--out", str(bundle), "--name", MODEL], log))
    if wanted("proxy_magnet_c16") or wanted("proxy_magnet_torch_c16"):  # the points that serve a fitted defense
        res["steps"].append(robustgate(["fit", "--bundle", str(bundle), "--defense", "magnet", "--dataset",
                                        "fashion-mnist", "--n-train", "500", "--n-val", "200", "--n-test", "200",
                                        "--params", "epochs=1", "--no-progress"], log))
    if any(wanted(f"proxy_{stage}_stream_c16") for stage in STREAM_STAGES):
        res["steps"].append(robustgate(["fit", "--bundle", str(bundle), "--defense", "stateful", "--name", "stateful",
                                        "--dataset", "fashion-mnist", "--n-train", "500", "--n-val", "200",
                                        "--n-test", "200", "--params", "method=knn", "steps=20", "batch_size=8",
                                        "--no-progress"], log))

    def point(name: str, r: dict) -> None:
        res["points"][name] = r
        log(f"{name}: {r['items_per_s']:.1f} items/s p50 {r['p50_ms']:.1f} ms errors {r['errors']}")

    onnx_path = str(bundle / "backbone.onnx")
    pts: dict[str, list[dict]] = {}
    servers: list = []
    # every server the points need at once, then the points in interleaved rounds: on a shared machine
    # the load drifts over minutes, and a reference measured minutes apart from its proxy would compare loads
    started: dict = {}

    def server(key: str, start):
        """The server ``key``, started on first use (a --points subset starts only those it needs)."""
        if key not in started:
            log(f"starting {key}")
            started[key] = start()
            servers.append(started[key])
        return started[key]

    def proxy(stage: str, onnxruntime: dict | None = None, nice0: bool = False):
        key = f"proxy_{stage}" + ("_spinrun" if onnxruntime else "") + ("_nice0" if nice0 else "")
        return server(key, lambda: serving.Proxy(work, bundle, {
            "backend": {"kind": "onnxruntime", **({"onnxruntime": onnxruntime} if onnxruntime else {})},
            **({"server": {"compute_nice": 0}} if nice0 else {}),
            "batching": BATCHING,
            "pipeline": {"stages": [] if stage == "none" else {**STAGES, **STREAM_STAGES}[stage]}}, None, MODEL))

    def upstream(spinning: bool = True):
        key = "mlserver" + ("" if spinning else "_nospin")

        def start():
            u = BigMessages(work / key, {MODEL: {"onnx": onnx_path, "intra_op_threads": 0, "spinning": spinning}})
            u.start()
            return u
        return server(key, start)

    def forward(spinning: bool = True, split: bool = False):
        # split: backend.upstream.max_request_bytes at its default (4 MiB, 6 items of 588 KiB a request) in
        # front of the same MLServer, so a coalesced batch goes as several requests
        limit = {} if split else {"max_request_bytes": BIG_MESSAGE}
        return server("proxy_upstream" + ("" if spinning else "_nospin") + ("_split" if split else ""),
                      lambda: serving.Proxy(work, bundle, {"backend": {"kind": "upstream", "upstream": limit},
                                                           "batching": BATCHING}, upstream(spinning).url, MODEL))

    def bare():
        return server("bare_grpc", lambda: BareServer(work, onnx_path, MODEL))

    def load(target, c: int, pids, uint8: bool = False, stream: bool = False):
        def measure():
            srv = target()
            pid = pids(srv)  # {probe name: pid} for the CPU probes
            if uint8:
                return uint8_load(srv.url, c, args.warmup, args.duration, pid)
            return loadgen.run_load(srv.url, MODEL, "input", SHAPE, c, 1, args.warmup, args.duration, server_pids=pid,
                                    pool=stream_pool() if stream else None)
        measure.server = target
        return measure

    try:
        plan = {}
        for c in (1, 16):
            plan[f"raw_ort_c{c}"] = lambda c=c: loadgen.run_raw_ort(onnx_path, "input", SHAPE, c, 1, args.warmup,
                                                                    args.duration)
            plan[f"bare_grpc_c{c}"] = load(bare, c, lambda s: {"bare": s.proc.pid})
            plan[f"proxy_none_c{c}"] = load(lambda: proxy("none"), c, lambda s: {"proxy": s.proc.pid})
            plan[f"proxy_none_uint8_c{c}"] = load(lambda: proxy("none"), c, lambda s: {"proxy": s.proc.pid}, uint8=True)
            plan[f"proxy_none_spinrun_c{c}"] = load(lambda: proxy("none", {"spinning": "run"}), c,
                                                    lambda s: {"proxy": s.proc.pid})
            plan[f"mlserver_c{c}"] = load(upstream, c, lambda s: {"mlserver": s.proc.pid})
            plan[f"proxy_upstream_c{c}"] = load(forward, c, lambda s: {"proxy": s.proc.pid,
                                                                       "mlserver": upstream().proc.pid})
            plan[f"proxy_upstream_split_c{c}"] = load(lambda: forward(split=True), c, lambda s: {
                "proxy": s.proc.pid, "mlserver": upstream().proc.pid})
        # MLServer's ONNX Runtime with its pool threads not spinning (ONNX Runtime's default spins): do the
        # upstream's spinning threads, holding the cores, slow the proxy's handling of the answer at concurrency 1?
        plan["mlserver_nospin_c1"] = load(lambda: upstream(False), 1, lambda s: {"mlserver": s.proc.pid})
        plan["proxy_upstream_nospin_c1"] = load(lambda: forward(False), 1, lambda s: {
            "proxy": s.proc.pid, "mlserver": upstream(False).proc.pid})
        # the proxy with its compute threads at the event loop's priority (server.compute_nice: 0): on cores
        # shared with other jobs the niced threads (default 10) wait behind them at every wake-up
        plan["proxy_none_nice0_c1"] = load(lambda: proxy("none", nice0=True), 1, lambda s: {"proxy": s.proc.pid})
        # the raw loop with the proxy's session options (backend.onnxruntime.spinning: false, the default)
        plan["raw_ort_proxy_options_c1"] = lambda: loadgen.run_raw_ort(onnx_path, "input", SHAPE, 1, 1, args.warmup,
                                                                       args.duration, session_config=SPINNING_CONFIG[False])
        for stage in STAGES:
            plan[f"proxy_{stage}_c16"] = load(lambda stage=stage: proxy(stage), 16, lambda s: {"proxy": s.proc.pid})
        for stage in ("none", *STREAM_STAGES):
            plan[f"proxy_{stage}_stream_c16"] = load(lambda stage=stage: proxy(stage), 16,
                                                     lambda s: {"proxy": s.proc.pid}, stream=True)
        plan = {name: measure for name, measure in plan.items() if wanted(name)}
        if not plan:
            raise SystemExit(f"--points {args.points!r} matches no point")
        for measure in plan.values():  # all up before the first round
            if hasattr(measure, "server"):
                measure.server()
        for i in range(args.rounds):
            for name, measure in plan.items():
                r = measure()
                pts.setdefault(name, []).append(r)
                p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"  # None: no call ended in the window
                log(f"round {i + 1}/{args.rounds} {name}: {r['items_per_s']:.1f} items/s p50 {p50} ms errors {r['errors']}")
    finally:
        for server in servers:
            server.stop()
    res["rounds"] = pts
    def median(rs: list[dict], key: str) -> float | None:  # None: no call ended in any window (too short)
        values = [r[key] for r in rs if r[key] is not None]
        return float(np.median(values)) if values else None

    res["points"] = {name: {"items_per_s": median(rs, "items_per_s"), "p50_ms": median(rs, "p50_ms"),
                            "p99_ms": median(rs, "p99_ms"),
                            "errors": {k: sum(r["errors"].get(k, 0) for r in rs) for r in rs for k in r["errors"]}}
                     for name, rs in pts.items()}
    res["load_average_end"] = serving.loadavg()
    res["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res["checks"] = checks(res["points"])
    out = Path(args.out_dir)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(res))
    log(f"wrote {out / args.name}.json and .md")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def checks(pts: dict) -> dict:
    pts = {k: v for k, v in pts.items() if v["p50_ms"] is not None and v["items_per_s"]}  # points with calls

    def p50_added(a: str, b: str) -> float:
        return pts[a]["p50_ms"] / pts[b]["p50_ms"] - 1.0

    def cost(a: str, b: str) -> float:
        return 1.0 - pts[a]["items_per_s"] / pts[b]["items_per_s"]

    def ratio(a: str, b: str) -> float:
        return pts[a]["items_per_s"] / pts[b]["items_per_s"]

    # (check, function, point, reference, target); a check is written when both points were measured
    specs = [
        ("inprocess_p50_added", p50_added, "proxy_none_c1", "raw_ort_c1", TARGET_PROXY_P50),
        ("inprocess_throughput_cost", cost, "proxy_none_c16", "raw_ort_c16", TARGET_PROXY_THROUGHPUT),
        # the fair reference: the same session behind a bare grpc.aio V2 server (the raw loop has no transport)
        ("inprocess_p50_added_vs_bare_grpc", p50_added, "proxy_none_c1", "bare_grpc_c1", TARGET_PROXY_P50),
        ("inprocess_throughput_cost_vs_bare_grpc", cost, "proxy_none_c16", "bare_grpc_c16", TARGET_PROXY_THROUGHPUT),
        ("upstream_p50_added", p50_added, "proxy_upstream_c1", "mlserver_c1", TARGET_PROXY_P50),
        ("upstream_throughput_cost", cost, "proxy_upstream_c16", "mlserver_c16", TARGET_PROXY_THROUGHPUT),
        # a coalesced batch sent as requests of at most 4 MiB (max_request_bytes' default), against one request
        ("upstream_split_p50_added", p50_added, "proxy_upstream_split_c1", "proxy_upstream_c1", None),
        ("upstream_split_throughput_cost", cost, "proxy_upstream_split_c16", "proxy_upstream_c16", None),
        *[(f"{stage}_throughput_cost", cost, f"proxy_{stage}_c16", "proxy_none_c16",
           None if stage in UNTARGETED_STAGES else TARGET_STAGE_THROUGHPUT) for stage in STAGES],
        *[(f"{stage}_throughput_cost", cost, f"proxy_{stage}_stream_c16", "proxy_none_stream_c16",
           TARGET_STAGE_THROUGHPUT) for stage in STREAM_STAGES],
        # where the in-process p50 goes, measured not targeted: transport, the session options, spinning "run"
        ("transport_p50_added", p50_added, "bare_grpc_c1", "raw_ort_c1", None),
        ("proxy_session_options_p50_added", p50_added, "raw_ort_proxy_options_c1", "raw_ort_c1", None),
        ("spinning_run_p50_added_vs_bare_grpc", p50_added, "proxy_none_spinrun_c1", "bare_grpc_c1", None),
        ("spinning_run_throughput_cost_vs_bare_grpc", cost, "proxy_none_spinrun_c16", "bare_grpc_c16", None),
        ("compute_nice_p50_added", p50_added, "proxy_none_c1", "proxy_none_nice0_c1", None),
        # the upstream's ONNX Runtime not spinning: the proxy's added p50 then, and what it does to MLServer direct
        ("upstream_nospin_p50_added", p50_added, "proxy_upstream_nospin_c1", "mlserver_nospin_c1", None),
        ("mlserver_nospin_p50_vs_spinning", p50_added, "mlserver_nospin_c1", "mlserver_c1", None),
        ("nice0_p50_added_vs_bare_grpc", p50_added, "proxy_none_nice0_c1", "bare_grpc_c1", None),
        # UINT8 is measured, not a target: its figures beside FP32's
        *[(f"uint8_vs_fp32_items_per_s_c{c}", ratio, f"proxy_none_uint8_c{c}", f"proxy_none_c{c}", None) for c in (1, 16)],
    ]
    out = {name: {"value": fn(a, b), "target": target, "points": [a, b]}
           for name, fn, a, b, target in specs if a in pts and b in pts}
    for v in out.values():
        v["met"] = None if v["target"] is None else bool(v["value"] <= v["target"])
    return out


def markdown(r: dict) -> str:
    m, pts = r["machine"], r["points"]
    lines = [
        "# Bring your own classifier at 224x224: torchvision ResNet-50 behind robustgate", "",
        f"Command: `{r['command']}` (started {r['started_utc']}, finished {r['finished_utc']}; revision "
        f"{m['robustgate_revision']}).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; ONNX Runtime {m['onnxruntime']}, grpcio "
        f"{m['grpcio']}, MLServer {m['mlserver']}. "
        + ("**Shared** with other jobs" if r['load_average_start'][0] > 1.5 else "No other job on the machine")
        + f" (load average {r['load_average_start']} at the start, {r['load_average_end']} at the end; the client and "
        f"the servers share the same 2 cores): each point is one "
        f"{r['settings']['duration_s']:.0f} s window after {r['settings']['warmup_s']:.0f} s of warm-up, all "
        f"servers up at once and the points measured in {r['settings']['rounds']} interleaved rounds; the table "
        "gives the median over the rounds (every round is in the JSON). Differences of a few percent are within "
        "the noise of this machine.", "",
        "Model: `torchvision.models.resnet50(weights=None)` (seeded random weights; nothing downloaded), exported to "
        "ONNX (3x224x224, dynamic batch) and imported with `robustgate import`. Steps:", "",
        *[f"- `{s}`" for s in r["steps"]], "",
        f"Client: {r['settings']['client']}; proxy: {r['settings']['proxy']}.", "",
        "| point | items/s | p50 ms | p99 ms | errors |", "| --- | --- | --- | --- | --- |",
    ]
    for name, p in pts.items():
        ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {name} | {p['items_per_s']:.1f} | {ms(p['p50_ms'])} | {ms(p['p99_ms'])} | {p['errors'] or ''} |")
    lines += ["", "| check | value | target | met |", "| --- | --- | --- | --- |"]
    for name, c in r["checks"].items():
        target = "" if c["target"] is None else f"<= {100 * c['target']:.0f}%"
        value = f"{c['value']:.2f}x" if name.startswith("uint8") else f"{100 * c['value']:+.1f}%"
        lines.append(f"| {name} | {value} | {target} | {'' if c['met'] is None else ('met' if c['met'] else '**not met**')} |")
    lines += ["", "Negative values: the proxy was faster than the reference in that window (its dynamic batching "
              "coalesces the 16 concurrent batch-1 requests; the raw reference runs them one by one).", "",
              "References: `raw_ort` is a closed loop on an ONNX Runtime session in the client's own process -- no "
              "transport at all; `bare_grpc` is the same session (ONNX Runtime's default options) behind a bare "
              "grpc.aio V2 server (bench/serving/bare_v2.py), so `proxy_none` over `bare_grpc` is the proxy's own "
              "work and `bare_grpc` over `raw_ort` the gRPC round trip of a 600 KB request. `raw_ort_proxy_options` "
              "is the raw loop with the proxy's session options (`backend.onnxruntime.spinning: false`: pool threads "
              "sleep at every operator); `proxy_none_spinrun` the proxy with `spinning: run` (busy-wait only while "
              "a batch runs); `proxy_none_nice0` the proxy with `server.compute_nice: 0` (its batch worker and ONNX "
              "Runtime's pool at the event loop's priority, as the bare server's: the default 10 lets the loop win a "
              "contended core under overload, and on cores shared with other jobs makes every wake-up of those "
              "threads wait behind them). `mlserver_nospin` is MLServer with its ONNX Runtime pool not spinning "
              "(`session.intra_op.allow_spinning` 0; ONNX Runtime spins by default), `proxy_upstream_nospin` the proxy "
              "in front of it: do a spinning upstream's idle threads, holding the cores, slow the proxy's handling of "
              "its answer at concurrency 1? (`upstream_nospin_p50_added` against `upstream_p50_added`.) "
              "`proxy_upstream_split` is the proxy with `backend.upstream.max_request_bytes` at its default, 4 MiB "
              "(the receive limit MLServer keeps unless raised, as here): a coalesced batch goes upstream as "
              "requests of at most 6 items, sent at once, where `proxy_upstream` sends it as one.", "",
              "`*_stream_c16`: benign clients' streams (each of the 16 closed-loop clients its own `x-client-id` and a "
              f"new picture with every request, {STREAM_IMAGES} Fashion-MNIST test images conformed to 3x224x224), so "
              "that a stateful stage searches its history for every query; `stateful_knn` is the k-NN stateful stage "
              "(issue 22; `action: log`, its encoder fused into the backbone's ONNX Runtime pass), its cost against "
              "`proxy_none_stream_c16`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
