"""Serving benchmark: raw ONNX Runtime ceiling vs the robustgate proxy vs an upstream MLServer.

One command (see README.md) measures, for batch-1 requests at concurrency 1, 16 and 64:

(a) raw in-process ONNX Runtime on the bundle's backbone, batch-1 callers at each concurrency and
    one caller at larger batch sizes; the ceiling is the best items/s of all these points;
(b) the proxy (``robustgate serve``, ONNX Runtime backend, no defense stages) with dynamic
    batching off and on;
(c) the proxy forwarding to Seldon MLServer (``backend.kind: upstream``) vs MLServer called
    directly, serving the same ONNX file through tests/proxy/upstream/mlserver_onnx.py;

and writes ``bench/results/serving.run.json`` + ``.md`` (command line, machine, load, every figure, the
three targets met or not) into ``--out-dir``. Every server is a separate process on 127.0.0.1;
the client is the grpc.aio closed-loop generator in loadgen.py, plus Triton's perf_analyzer
where it can run against the target (it needs Triton's ModelConfig RPC; failures are recorded).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402  (bench/ is not a package)

from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

TARGETS = {  # target -> (which server, proxy config sections)
    "proxy_onnx_unbatched": ("proxy", {"backend": {"kind": "onnxruntime"}, "batching": {"enabled": False}}),
    "proxy_onnx_batched": ("proxy", {"backend": {"kind": "onnxruntime"}, "batching": {"enabled": True}}),
    "proxy_upstream_unbatched": ("proxy", {"backend": {"kind": "upstream"}, "batching": {"enabled": False}}),
    "proxy_upstream_batched": ("proxy", {"backend": {"kind": "upstream"}, "batching": {"enabled": True}}),
    "mlserver_direct": ("mlserver", {}),
}
RAW_BATCHES = (1, 8, 32, 64, 128)
DEFAULT_PERF_ANALYZER = Path.home() / ".cache" / "robustgate" / "perf_analyzer"
TARGET_FORWARDING_P50 = 0.50  # issue 25 (was 0.30, an earlier issue)
TARGET_BATCHING_SPEEDUP = 3.0
TARGET_CEILING_FRACTION = 0.50


def load_harness():
    path = REPO / "tests" / "proxy" / "upstream" / "harness.py"
    spec = importlib.util.spec_from_file_location("robustgate_tests_upstream_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = load_harness()


# ---- the machine --------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    import grpc as _grpc
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "grpcio": _grpc.__version__, "mlserver": _version("mlserver"),
        "robustgate_revision": _git_revision(),
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# ---- servers --------------------------------------------------------------------------------
def wait_ready(url: str, model: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
            try:
                if (stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
                        and stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s} s; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


class Proxy:
    """``robustgate serve --config`` as a subprocess on 127.0.0.1 free ports."""

    def __init__(self, workdir: Path, bundle: Path, sections: dict, upstream_url: str | None, model: str):
        self.port, self.model = harness.free_port(), model
        cfg = {
            "bundle": str(bundle),
            "server": {"host": "127.0.0.1", "port": self.port, "metrics_port": harness.free_port(),
                       "metrics_host": "127.0.0.1", "grace_s": 2.0,
                       # one process: this client's one channel reaches one worker, and the CPU probe reads
                       # one pid (several workers: bench/serving/workers.py)
                       "workers": 1},
            "batching": {"max_batch_size": 64, "max_queue_delay_ms": 2.0, "max_queue_items": 4096},
            "limits": {"max_batch_items": 256},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value}
        if cfg["backend"]["kind"] == "upstream":
            cfg["backend"]["upstream"] = {**cfg["backend"].get("upstream", {}), "url": upstream_url,
                                          "model_name": model}
        self.config = cfg
        self.config_path = workdir / f"proxy-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log = workdir / f"proxy-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTGATE_")}
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([str(Path(sys.executable).with_name("robustgate")), "serve", "--config",
                                          str(self.config_path), "--log-level", "WARNING"],
                                         stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_ready(self.url, model, self.proc, self.log)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- perf_analyzer ----------------------------------------------------------------------------
def find_perf_analyzer(explicit: str | None) -> tuple[Path | None, dict]:
    """perf_analyzer binary and the environment it needs (LD_LIBRARY_PATH for libcudart.so.12)."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [DEFAULT_PERF_ANALYZER / "bin" / "perf_analyzer"]
    if shutil.which("perf_analyzer"):
        candidates.append(Path(shutil.which("perf_analyzer")))
    for c in candidates:
        if c.is_file():
            root = c.resolve().parents[1]
            libs = [str(p) for p in [root / "nvidia" / "cuda_runtime" / "lib"] if p.is_dir()]
            env = dict(os.environ)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
            return c, env
    return None, {}


def run_perf_analyzer(binary: Path, env: dict, url: str, model: str, input_name: str, item_shape: tuple,
                      concurrency: int, workdir: Path, window_ms: int) -> dict:
    data = workdir / "pa_input.json"
    x = np.random.default_rng(0).random(item_shape, dtype=np.float32)  # [C, H, W] in [0, 1)
    data.write_text(json.dumps({"data": [{input_name: {"content": x.ravel().tolist(), "shape": list(item_shape)}}]}))
    out = workdir / f"pa-{model}-{url.rsplit(':', 1)[1]}-{concurrency}.csv"
    cmd = [str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", "1", "--concurrency-range", str(concurrency),
           "--input-data", str(data), "-p", str(window_ms), "-s", "100", "--max-trials", "6", "-f", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stdout + proc.stderr).strip()[-500:] or f"exit {proc.returncode}"}
    row = next(csv.DictReader(out.open()))
    return {
        "items_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3, "p90_ms": float(row["p90 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3, "command": " ".join(cmd),
    }


# ---- the run ------------------------------------------------------------------------------------
def resolve_bundle(arg: str | None, workdir: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given with --bundle"
    default = REPO / "bundles" / "default"
    if (default / "bundle.yaml").is_file():
        # a snapshot: the trainer may replace bundles/default while the benchmark runs
        snapshot = workdir / "bundle-default"
        shutil.copytree(default, snapshot)
        return snapshot, "bundles/default (copied at the start of the run)"
    # No trained bundle yet: the default `cnn` architecture with seeded random weights costs the
    # same per image as a trained one, which is all a serving benchmark needs.
    import torch

    from robustgate.models.archs import build_arch
    from robustgate.models.export import write_bundle

    torch.manual_seed(0)
    module = build_arch("cnn").eval()
    out = workdir / "cnn-untrained"
    write_bundle(out, module, arch="cnn", arch_kwargs={}, classes=[f"class{i}" for i in range(10)],
                 input_shape=(1, 28, 28), name="cnn", features=True, seed=0)
    return out, ("bundles/default did not exist: the default `cnn` architecture (width 32, hidden 128) "
                 "with seeded random weights, exported by robustgate.models.export")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle directory (default: bundles/default, else a tiny CNN bundle)")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client concurrencies")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    p.add_argument("--perf-analyzer", help="perf_analyzer binary (default: install_perf_analyzer.sh's location)")
    p.add_argument("--pa-window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    p.add_argument("--ab-rounds", type=int, default=8,
                   help="interleaved 1 s windows per side for the forwarding-overhead A/B (0 = skip)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default="serving.run", help="writes OUT_DIR/NAME.json and OUT_DIR/NAME.md")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    targets = args.targets.split(",")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {list(TARGETS)}")

    workdir = Path(tempfile.mkdtemp(prefix="robustgate-bench-"))
    bundle_dir, bundle_source = resolve_bundle(args.bundle, workdir)
    bundle = Bundle.load(bundle_dir)
    model, input_name, item_shape = bundle.name, bundle.input.name, tuple(bundle.input.shape)
    onnx_file = str(bundle.path(bundle.spec.backbone.onnx))
    pa_binary, pa_env = find_perf_analyzer(args.perf_analyzer)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "run.py " + " ".join(argv),
        "started_utc": started, "machine": machine(), "load_average_start": loadavg(),
        "bundle": {"path": str(bundle_dir), "source": bundle_source, "name": model, "input": list(item_shape),
                   "arch": bundle.spec.backbone.arch, "backbone_sha256": bundle.backbone_id},
        "settings": {"warmup_s": args.warmup, "duration_s": args.duration, "concurrency": concurrencies,
                     "client": "bench/serving/loadgen.py (grpc.aio, one channel, closed loop, raw FP32, batch-1)"},
        "raw_onnxruntime": {"batch1": {}, "by_batch": {}},
        "targets": {}, "perf_analyzer": {"binary": str(pa_binary) if pa_binary else None, "results": {}},
    }
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    # (a) the ceiling
    for c in concurrencies:
        r = loadgen.run_raw_ort(onnx_file, input_name, item_shape, c, 1, args.warmup, args.duration)
        results["raw_onnxruntime"]["batch1"][str(c)] = r
        log(f"raw ORT batch 1 concurrency {c}: {r['items_per_s']:.0f} items/s p50 {r['p50_ms']:.3f} ms")
    for b in RAW_BATCHES:
        r = loadgen.run_raw_ort(onnx_file, input_name, item_shape, 1, b, args.warmup, args.duration)
        results["raw_onnxruntime"]["by_batch"][str(b)] = r
        log(f"raw ORT batch {b}: {r['items_per_s']:.0f} items/s")

    # (b), (c)
    upstream = None
    if any(TARGETS[t][0] == "mlserver" or TARGETS[t][1]["backend"]["kind"] == "upstream" for t in targets):
        upstream = harness.MLServerProcess(workdir / "mlserver", {model: {"onnx": onnx_file, "intra_op_threads": 0}})
        upstream.start()
        results["mlserver"] = {"url": upstream.url, "runtime": "tests/proxy/upstream/mlserver_onnx.py",
                               "settings": "parallel_workers 0, adaptive batching off, ORT default threads"}
    try:
        for name in targets:
            kind, sections = TARGETS[name]
            proxy = Proxy(workdir, bundle_dir, sections, upstream.url if upstream else None, model) \
                if kind == "proxy" else None
            url = proxy.url if proxy else upstream.url
            entry = {"config": proxy.config if proxy else {"server": "mlserver", "url": upstream.url}, "points": {}}
            try:
                for c in concurrencies:
                    forwards = kind == "mlserver" or sections["backend"]["kind"] == "upstream"
                    pids = {"mlserver": upstream.proc.pid} if forwards else {}
                    if proxy:
                        pids["proxy"] = proxy.proc.pid
                    r = loadgen.run_load(url, model, input_name, item_shape, c, 1, args.warmup, args.duration,
                                         server_pids=pids)
                    entry["points"][str(c)] = r
                    log(f"{name} concurrency {c}: {r['items_per_s']:.0f} items/s p50 {r['p50_ms']:.2f} ms "
                        f"p99 {r['p99_ms']:.2f} ms errors {r['errors']} cpu {r['cpu_cores']}")
                if pa_binary:
                    pa: dict = {}
                    for c in concurrencies:
                        pa[str(c)] = run_perf_analyzer(pa_binary, pa_env, url, model, input_name, item_shape, c,
                                                       workdir, args.pa_window_ms)
                        log(f"{name} perf_analyzer concurrency {c}: {pa[str(c)]}")
                        if "error" in pa[str(c)]:
                            break
                    results["perf_analyzer"]["results"][name] = pa
            finally:
                if proxy:
                    proxy.stop()
            results["targets"][name] = entry
        if "proxy_upstream_unbatched" in targets and "mlserver_direct" in targets and args.ab_rounds:
            results["forwarding_ab"] = forwarding_ab(workdir, bundle_dir, upstream, model, input_name, item_shape,
                                                     min(concurrencies), args.ab_rounds, log)
    finally:
        if upstream:
            upstream.stop()

    results["load_average_end"] = loadavg()
    results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["checks"] = checks(results, concurrencies)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(results, concurrencies))
    log(f"wrote {out / args.name}.json and .md")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def forwarding_ab(workdir: Path, bundle_dir: Path, upstream, model: str, input_name: str, item_shape: tuple,
                  concurrency: int, rounds: int, log) -> dict:
    """Forwarding overhead measured A/B: 1 s windows alternating between MLServer direct and the proxy
    forwarding to it (both running all along), so that both see the same background load; the
    overhead is taken from the medians of the per-window p50s."""
    proxy = Proxy(workdir, bundle_dir, TARGETS["proxy_upstream_unbatched"][1], upstream.url, model)
    p50: dict[str, list[float]] = {"mlserver_direct": [], "proxy_upstream_unbatched": []}
    try:
        for _ in range(rounds):
            for name, url in (("mlserver_direct", upstream.url), ("proxy_upstream_unbatched", proxy.url)):
                r = loadgen.run_load(url, model, input_name, item_shape, concurrency, 1, 0.2, 1.0)
                p50[name].append(r["p50_ms"])
    finally:
        proxy.stop()
    out = {"concurrency": concurrency, "rounds": rounds, "window_s": 1.0, "p50_ms": p50,
           "median_p50_ms": {k: float(np.median(v)) for k, v in p50.items()}}
    log(f"forwarding A/B at concurrency {concurrency}: median p50 {out['median_p50_ms']}")
    return out


def best_raw(raw: dict) -> dict | None:
    """The raw ONNX Runtime ceiling: the best items/s of every raw point measured, batch-1 requests at
    each concurrency and each larger batch size alike (not only the best batch size's)."""
    pts = [{"batch": 1, "concurrency": int(c), "items_per_s": p["items_per_s"]} for c, p in raw["batch1"].items()]
    pts += [{"batch": int(b), "concurrency": int(p.get("concurrency", 1)), "items_per_s": p["items_per_s"]}
            for b, p in raw["by_batch"].items()]
    return max(pts, key=lambda p: p["items_per_s"]) if pts else None


def checks(r: dict, concurrencies: list[int]) -> dict:
    t = r["targets"]
    out: dict = {}

    def point(name: str, c: int) -> dict | None:
        return t.get(name, {}).get("points", {}).get(str(c))

    lo, hi = min(concurrencies), max(concurrencies)
    fwd, direct = point("proxy_upstream_unbatched", lo), point("mlserver_direct", lo)
    ab = r.get("forwarding_ab")
    if ab:  # interleaved windows: the fairer comparison on a shared machine
        fwd_p50, direct_p50 = ab["median_p50_ms"]["proxy_upstream_unbatched"], ab["median_p50_ms"]["mlserver_direct"]
        how = f"median of {ab['rounds']} interleaved 1 s windows"
    elif fwd and direct:
        fwd_p50, direct_p50, how = fwd["p50_ms"], direct["p50_ms"], "one 5 s window each"
    if ab or (fwd and direct):
        added = fwd_p50 / direct_p50 - 1
        out["forwarding_p50_overhead"] = {
            "target": f"<= {TARGET_FORWARDING_P50:.0%} added p50 latency at concurrency {lo}",
            "proxy_p50_ms": fwd_p50, "direct_p50_ms": direct_p50, "added": added, "measured_as": how,
            "met": added <= TARGET_FORWARDING_P50,
        }
    on, off = point("proxy_onnx_batched", hi), point("proxy_onnx_unbatched", hi)
    if on and off:
        speedup = on["items_per_s"] / off["items_per_s"]
        out["batching_speedup"] = {
            "target": f">= {TARGET_BATCHING_SPEEDUP}x unbatched throughput at concurrency {hi}",
            "batched_items_per_s": on["items_per_s"], "unbatched_items_per_s": off["items_per_s"],
            "speedup": speedup, "met": speedup >= TARGET_BATCHING_SPEEDUP,
        }
    ceiling = best_raw(r["raw_onnxruntime"])
    if ceiling:
        proxy_pts = [(n, c, p["items_per_s"]) for n, e in t.items() if n.startswith("proxy_onnx")
                     for c, p in e["points"].items()]
        if proxy_pts:
            n, c, best = max(proxy_pts, key=lambda v: v[2])
            frac = best / ceiling["items_per_s"]
            out["fraction_of_ceiling"] = {
                "target": f">= {TARGET_CEILING_FRACTION:.0%} of raw ONNX Runtime's best throughput at any batch and concurrency",
                "ceiling_batch": ceiling["batch"], "ceiling_concurrency": ceiling["concurrency"],
                "ceiling_items_per_s": ceiling["items_per_s"],
                "proxy_best": {"target": n, "concurrency": int(c), "items_per_s": best},
                "fraction": frac, "met": frac >= TARGET_CEILING_FRACTION,
            }
    return out


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(r: dict, concurrencies: list[int]) -> str:
    m = r["machine"]
    lines = [
        "# Serving benchmark", "",
        "Written by `bench/serving/run.py` (do not edit by hand; rerun it).", "",
        f"- Command: `{r['command']}`",
        f"- Run: {r['started_utc']} -> {r['finished_utc']}; robustgate revision {m['robustgate_revision']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, grpcio {m['grpcio']}, mlserver {m['mlserver']}",
        f"- Load average (1/5/15 min) at start {r['load_average_start']}, at end {r['load_average_end']} "
        "(the 1-minute figure at the start says whether other work shared the cores). **The client, the proxy and "
        "MLServer share the same cores: every figure is a lower bound.**",
        f"- Model: `{r['bundle']['name']}` ({r['bundle']['source']}; arch `{r['bundle']['arch']}`, backbone.onnx "
        f"sha256 {r['bundle']['backbone_sha256'][:12]}…), input {r['bundle']['input']} FP32.",
        f"- Client: {r['settings']['client']}; {r['settings']['warmup_s']} s warm-up, "
        f"{r['settings']['duration_s']} s measured per point. Latency in ms, throughput in items/s.", "",
        "## Targets", "",
        "| target | measured | met |", "| --- | --- | --- |",
    ]
    c = r["checks"]
    if "forwarding_p50_overhead" in c:
        v = c["forwarding_p50_overhead"]
        lines.append(f"| {v['target']} | proxy->MLServer p50 {_f(v['proxy_p50_ms'])} ms vs MLServer direct "
                     f"{_f(v['direct_p50_ms'])} ms ({v['measured_as']}): {v['added']:+.0%} | "
                     f"{'yes' if v['met'] else 'no'} |")
    if "batching_speedup" in c:
        v = c["batching_speedup"]
        lines.append(f"| {v['target']} | {_f(v['batched_items_per_s'], 0)} vs {_f(v['unbatched_items_per_s'], 0)} "
                     f"items/s: {v['speedup']:.2f}x | {'yes' if v['met'] else 'no'} |")
    if "fraction_of_ceiling" in c:
        v = c["fraction_of_ceiling"]
        pb_ = v["proxy_best"]
        lines.append(f"| {v['target']} | proxy best {_f(pb_['items_per_s'], 0)} items/s ({pb_['target']}, "
                     f"concurrency {pb_['concurrency']}) vs ceiling {_f(v['ceiling_items_per_s'], 0)} items/s "
                     f"(batch {v['ceiling_batch']}, concurrency {v.get('ceiling_concurrency', 1)}): "
                     f"{v['fraction']:.0%} | {'yes' if v['met'] else 'no'} |")
    lines += ["", "## (a) Raw in-process ONNX Runtime (the ceiling)", "",
              "| batch | concurrency | items/s | p50 | p99 |", "| --- | --- | --- | --- | --- |"]
    for cc, p in r["raw_onnxruntime"]["batch1"].items():
        lines.append(f"| 1 | {cc} | {_f(p['items_per_s'], 0)} | {_f(p['p50_ms'], 3)} | {_f(p['p99_ms'], 3)} |")
    for b, p in r["raw_onnxruntime"]["by_batch"].items():
        if b != "1":
            lines.append(f"| {b} | 1 | {_f(p['items_per_s'], 0)} | {_f(p['p50_ms'], 3)} | {_f(p['p99_ms'], 3)} |")
    lines += ["", "## (b), (c) Through the servers (batch-1 requests)", "",
              "| target | concurrency | items/s | p50 | p90 | p99 | errors | CPU cores used |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in r["targets"].items():
        for cc, p in e["points"].items():
            errors = ", ".join(f"{k} {v}" for k, v in p["errors"].items()) or "0"
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_cores"].items())
            lines.append(f"| {name} | {cc} | {_f(p['items_per_s'], 0)} | {_f(p['p50_ms'])} | {_f(p['p90_ms'])} | "
                         f"{_f(p['p99_ms'])} | {errors} | {cpu} |")
    lines += ["", "Targets: `proxy_onnx_*` = robustgate with its in-process ONNX Runtime backend and no defense "
              "stages; `proxy_upstream_*` = robustgate forwarding to MLServer; `*_batched` = dynamic batching on "
              "(max batch 64, max queue delay 2 ms); `mlserver_direct` = the same MLServer called directly. "
              "CPU cores used = CPU seconds per second of the load generator (client) and of each server "
              "process during the measured window; with 2 cores, client + servers near 2.0 means the machine, "
              "not the server, was the limit.", "",
              "## perf_analyzer", ""]
    pa = r["perf_analyzer"]
    if not pa["binary"]:
        lines.append("perf_analyzer was not found (bench/serving/install_perf_analyzer.sh installs it); "
                     "only the grpc.aio client ran.")
    else:
        lines.append(f"Binary: `{pa['binary']}`.")
        lines.append("")
        for name, pts in pa["results"].items():
            for cc, p in pts.items():
                if "error" in p:
                    lines.append(f"- {name}, concurrency {cc}: could not run: `{p['error'].splitlines()[-1]}`")
                else:
                    lines.append(f"- {name}, concurrency {cc}: {_f(p['items_per_s'], 0)} items/s, p50 "
                                 f"{_f(p['p50_ms'])} ms, p99 {_f(p['p99_ms'])} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
