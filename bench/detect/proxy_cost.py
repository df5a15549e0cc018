"""Detection's cost measured through the proxy: items/s at saturation of a real ``robustgate serve``
with the pipeline empty vs with detector stages, clients sending batch-64 ModelInfer requests.

Issue 5 target: "detection adds at most 25% to the proxy's per-image throughput cost at batch 64".
Per-image cost = 1 / (items/s at saturation); added cost = items/s(empty) / items/s(variant) - 1.

    .venv/bin/python bench/detect/proxy_cost.py --bundle bundles/default \\
        --variant empty= --variant magnet_l1=magnet_l1 --rounds 6 \\
        --out bench/results/detect.proxy_cost

Each ``--variant LABEL=STAGE[,STAGE...][@BUNDLE]`` is one proxy process (``robustgate serve
--config``, the serving benchmark's launcher, bench/serving/run.py) serving ``BUNDLE`` (default
``--bundle``) with the named stages -- fitted defenses of that bundle, action ``reject``, their
online part in ONNX Runtime (``runtime: onnx``) -- and otherwise the defaults of deploy/default.yaml
(onnxruntime backend on cpu, dynamic batching max 64 / 2 ms, request verdict mode). An empty
stage list is the undefended proxy. Every proxy runs all along; the measurement windows alternate
between them round after round (``--rounds``), so that the shared machine's load drift hits every
variant alike; the load average is recorded at every window.

Load: bench/serving/loadgen.py's closed loop (grpc.aio, raw FP32), ``--concurrency`` requests in
flight, each of ``--batch`` items. The items are clean Fashion-MNIST test images that every
variant accepts: a request holding an item some detector rejects fails with PERMISSION_DENIED (the
documented status) and the item named in its trailing metadata is replaced by the next test image,
until one batch passes every variant -- so the measured traffic is the clean traffic a deployment
serves, and no request errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "serving"))
import loadgen  # noqa: E402  (bench/ is not a package)
import run as serving  # noqa: E402

from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402


def parse_variant(text: str, default_bundle: Path) -> tuple[str, Path, list[str]]:
    label, sep, rest = text.partition("=")
    if not sep or not label:
        raise ValueError(f"--variant expects LABEL=STAGE[,STAGE][@BUNDLE], got {text!r}")
    stages_part, _, bundle_part = rest.partition("@")
    stages = [s for s in stages_part.split(",") if s]
    return label, Path(bundle_part) if bundle_part else default_bundle, stages


def pipeline_section(bundle: Path, stages: list[str], extra: dict) -> dict:
    spec = Bundle.load(bundle).spec
    out = []
    for name in stages:
        if name not in spec.defenses:
            raise ValueError(f"{bundle}: no fitted defense {name!r} (has: {', '.join(spec.defenses) or 'none'})")
        params = {"runtime": "onnx", **extra.get(name, {})}
        out.append({"name": name, "kind": spec.defenses[name].kind, "action": "reject", "params": params})
    return {"stages": out, "failure_policy": "fail-closed", "verdict_mode": "request"}


def accepted_batch(urls: dict[str, str], model: str, input_name: str, pool: np.ndarray, batch: int) -> tuple[np.ndarray, int]:
    """``batch`` items of ``pool`` ``[N, C, H, W]`` that every proxy in ``urls`` accepts; returns the
    batch and how many items were replaced because some detector rejected them."""
    chosen, nxt, replaced = list(range(batch)), batch, 0
    while True:
        x = pool[chosen]
        rejected_at = None
        for label, url in urls.items():
            with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
                try:
                    pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(loadgen.make_request(model, input_name, x), timeout=60)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                        raise
                    meta = dict(exc.trailing_metadata() or ())
                    rejected_at = int(meta["robustgate-item"])
                    break
        if rejected_at is None:
            return x, replaced
        if nxt >= len(pool):
            raise RuntimeError("ran out of test images that every variant accepts")
        chosen[rejected_at], nxt, replaced = nxt, nxt + 1, replaced + 1


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default")
    p.add_argument("--variant", action="append", required=True, help="LABEL=STAGE[,STAGE][@BUNDLE]; LABEL= is empty")
    p.add_argument("--overrides", type=json.loads, default={},
                   help='JSON {"LABEL": {"params": {"STAGE": {param: value}}, "sections": {"batching": {"workers": 2}}}}: '
                        'stage params merged over runtime: onnx, config sections merged over the defaults')
    p.add_argument("--backend-threads", type=int, default=0, help="backend.onnxruntime.intra_op_threads (0 = default)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = p.parse_args()

    variants = [parse_variant(v, args.bundle) for v in args.variant]
    base_label = variants[0][0]
    bundle0 = Bundle.load(args.bundle)
    model, input_name, item_shape = bundle0.name, bundle0.input.name, tuple(bundle0.input.shape)
    from robustgate.models.data import load_splits

    pool = load_splits().test_x.numpy()[:2000]  # clean test images [N, 1, 28, 28]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    up_start = uptime()
    print(up_start, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rg-proxy-cost-"))
    proxies: dict[str, serving.Proxy] = {}
    try:
        for label, bundle, stages in variants:
            over = args.overrides.get(label, {})
            sections = {"backend": {"kind": "onnxruntime", "onnxruntime": {"device": "cpu", "intra_op_threads": args.backend_threads}},
                        "batching": {"enabled": True},
                        "pipeline": pipeline_section(bundle, stages, over.get("params", {}))}
            for key, value in over.get("sections", {}).items():
                sections[key] = {**sections.get(key, {}), **value}
            proxies[label] = serving.Proxy(workdir, bundle, sections, None, model)
        x, replaced = accepted_batch({k: v.url for k, v in proxies.items()}, model, input_name, pool, args.batch)
        print(f"batch of {args.batch} clean test images accepted by every variant ({replaced} replaced)", flush=True)

        windows: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # alternate which variant goes first
            for label, _, _ in order:
                load_before = serving.loadavg()
                res = loadgen_run(proxies[label], model, input_name, x, args)
                res["loadavg_before"] = load_before
                if res["errors"]:
                    raise RuntimeError(f"{label}: requests failed during the window: {res['errors']}")
                windows[label].append(res)
                print(f"round {r} {label}: {res['items_per_s']:.0f} items/s p50 {res['p50_ms']:.1f} ms "
                      f"cpu {res['cpu_cores']} load {load_before}", flush=True)
    finally:
        for px in proxies.values():
            px.stop()
    up_end = uptime()
    print(up_end, flush=True)

    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": started,
              "uptime_start": up_start, "uptime_end": up_end,
              "revision": serving._git_revision(), "machine": serving.machine(),
              "batch": args.batch, "concurrency": args.concurrency, "rounds": args.rounds,
              "window_s": args.duration, "warmup_s": args.warmup, "backend_intra_op_threads": args.backend_threads,
              "items_replaced": replaced, "baseline": base_label, "variants": {}}
    base = windows[base_label]
    for label, bundle, stages in variants:
        w = windows[label]
        ips = [v["items_per_s"] for v in w]
        # per-round ratio against the baseline's window of the same round (adjacent in time)
        ratios = [b["items_per_s"] / v["items_per_s"] - 1.0 for b, v in zip(base, w)]
        result["variants"][label] = {
            "bundle": str(bundle), "stages": stages,
            "config": {k: proxies[label].config[k] for k in ("backend", "batching", "pipeline")},
            "items_per_s": ips, "median_items_per_s": statistics.median(ips),
            "median_us_per_item": 1e6 / statistics.median(ips),
            "median_p50_ms": statistics.median(v["p50_ms"] for v in w),
            "proxy_cpu_cores": statistics.median(v["cpu_cores"].get("proxy", float("nan")) for v in w),
            "client_cpu_cores": statistics.median(v["cpu_cores"]["client"] for v in w),
            "added_cost_per_round": ratios, "added_cost_median": statistics.median(ratios),
            "windows": w,
        }
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "windows"} for k, v in result["variants"].items()}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name(args.out.name + ".json").write_text(json.dumps(result, indent=1))
        args.out.with_name(args.out.name + ".md").write_text(markdown(result))
    return 0


def loadgen_run(proxy, model: str, input_name: str, x: np.ndarray, args) -> dict:
    """One closed-loop window on ``proxy`` with the fixed batch ``x`` (CPU of client and proxy)."""
    import asyncio

    req = loadgen.make_request(model, input_name, x)
    probes = {"client": time.process_time, "proxy": lambda: loadgen.process_cpu_s(proxy.proc.pid)}
    return asyncio.run(loadgen._load(proxy.url, req, args.batch, args.concurrency, args.warmup, args.duration,
                                     60.0, probes))


def markdown(r: dict) -> str:
    base = r["baseline"]
    lines = [
        "# Detection cost through the proxy (issue 5)",
        "",
        "Written by `bench/detect/proxy_cost.py` (do not edit by hand; rerun it).",
        "",
        f"- Command: `{r['command']}`",
        f"- Run: {r['started']}, revision {r['revision']}; machine: {r['machine'].get('cpu', '?')}",
        f"- `uptime` at start: `{r['uptime_start']}`; at end: `{r['uptime_end']}`"
        " (2 cores shared with other engineers, client and proxy on the same cores).",
        f"- Load: closed loop, {r['concurrency']} requests in flight, {r['batch']} clean test images per request "
        f"(accepted by every variant; {r['items_replaced']} replaced), raw FP32; {r['rounds']} rounds of "
        f"{r['warmup_s']:g} s warm-up + {r['window_s']:g} s measured per variant, variants alternated.",
        f"- Proxies: `robustgate serve`, onnxruntime backend (intra-op threads {r['backend_intra_op_threads'] or 'default'}),"
        " batching max 64 / 2 ms, request verdict mode; detector stages with action reject and runtime onnx.",
        "",
        f"| variant | stages | items/s (median) | us per item | added cost vs {base} (median of per-round ratios) | p50 ms | proxy CPU cores | client CPU cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, v in r["variants"].items():
        added = "baseline" if label == base else f"**{100 * v['added_cost_median']:+.0f}%**"
        workers = v["config"]["batching"].get("workers")
        lines.append(f"| {label} | {', '.join(v['stages']) or '(none)'}{f' (batching workers {workers})' if workers else ''} | {v['median_items_per_s']:,.0f} | "
                     f"{v['median_us_per_item']:.0f} | {added} | {v['median_p50_ms']:.1f} | "
                     f"{v['proxy_cpu_cores']:.2f} | {v['client_cpu_cores']:.2f} |")
    lines += ["", "Per-round items/s:", ""]
    for label, v in r["variants"].items():
        lines.append(f"- {label}: " + ", ".join(f"{x:,.0f}" for x in v["items_per_s"]))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
