"""Soak: a bounded run at steady load against a real ``robustgate serve`` with the default bundle.

Open loop: ``--rate`` ModelInfer requests per second (each 1..``--max-batch`` Fashion-MNIST test
images, raw FP32, what tritonclient sends), at most ``--max-inflight`` outstanding (a tick that
finds them all busy is counted as ``client_skipped``, so a slow server shows up instead of the
load silently dropping). Every accepted answer is checked against ONNX Runtime run here on the
bundle's backbone (the default pipeline's MagNet only rejects, it does not change the input), so
a wrong or swapped answer counts as a mismatch. Recorded per minute: answers by status, p50/p99
latency, the server's resident memory (VmRSS) and the load average; overall: RSS at start, after
the first minute (warm: ONNX Runtime arenas and gRPC buffers allocated) and at the end, and the
growth from the warm value (target < 5%).

    nice -n 5 .venv/bin/python bench/hardening/soak.py --minutes 10   # ~10.5 min

Writes bench/results/hardening.soak.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

TARGET_RSS_GROWTH = 0.05


def reference_logits(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """The backbone's logits for ``x`` [N, C, H, W], computed in this process (one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)), options, providers=["CPUExecutionProvider"])
    return sess.run([bundle.spec.backbone.logits_output], {bundle.input.name: x})[0]  # [N, K]


async def run_load(url: str, model: str, x: np.ndarray, ref: np.ndarray, pid: int, args) -> dict:
    rng = random.Random(args.seed)
    minutes: list[dict] = []
    cur: dict = {}
    inflight = 0
    tasks: set[asyncio.Task] = set()

    def new_minute() -> dict:
        return {"statuses": Counter(), "latencies": [], "mismatches": 0, "client_skipped": 0, "error_messages": []}

    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(idx: np.ndarray, bucket: dict) -> None:
            nonlocal inflight
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(common.infer_request(model, x[idx]), timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                bucket["statuses"][exc.code().name] += 1
                if exc.code() != grpc.StatusCode.PERMISSION_DENIED and len(bucket["error_messages"]) < 5:
                    bucket["error_messages"].append(f"{exc.code().name}: {exc.details()}")
                return
            finally:
                inflight -= 1
            bucket["latencies"].append(time.perf_counter() - t0)
            bucket["statuses"]["OK"] += 1
            got = common.logits_of(resp)
            if got.shape != ref[idx].shape or not np.allclose(got, ref[idx], rtol=1e-4, atol=1e-4):
                bucket["mismatches"] += 1

        start = time.perf_counter()
        period = 1.0 / args.rate
        k = 0
        for minute in range(args.minutes):
            cur = new_minute()
            minutes.append(cur)
            end = start + (minute + 1) * 60.0
            while True:
                t = start + k * period
                if t >= end:
                    break
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                k += 1
                if inflight >= args.max_inflight:
                    cur["client_skipped"] += 1
                    continue
                n = rng.randint(1, args.max_batch)
                idx = np.asarray(rng.sample(range(len(x)), n))
                inflight += 1
                task = asyncio.get_running_loop().create_task(one(idx, cur))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            cur["rss_mib"] = common.rss_mib(pid)
            cur["loadavg"] = common.loadavg()
            print(f"minute {minute + 1}: {dict(cur['statuses'])} p50 {common.percentile_ms(cur['latencies'], 50)} "
                  f"p99 {common.percentile_ms(cur['latencies'], 99)} rss {cur['rss_mib']:.1f} MiB load {cur['loadavg']}",
                  flush=True)
        if tasks:
            await asyncio.gather(*tasks)
        # after the run: the server still answers a known request correctly
        check = await stub.ModelInfer(common.infer_request(model, x[:2]), timeout=30)
        final_ok = bool(np.allclose(common.logits_of(check), ref[:2], rtol=1e-4, atol=1e-4))
        ready = (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
    out = []
    for i, m in enumerate(minutes):
        out.append({
            "minute": i + 1, "statuses": dict(m["statuses"]), "requests": sum(m["statuses"].values()),
            "p50_ms": common.percentile_ms(m["latencies"], 50), "p99_ms": common.percentile_ms(m["latencies"], 99),
            "mismatches": m["mismatches"], "client_skipped": m["client_skipped"], "rss_mib": m["rss_mib"],
            "loadavg": m["loadavg"], "error_messages": m["error_messages"],
        })
    return {"minutes": out, "final_answer_correct": final_ok, "ready_after": bool(ready)}


def markdown(r: dict) -> str:
    s = r["summary"]
    lines = [
        "# Hardening: soak",
        "",
        f"A {r['config']['minutes']}-minute steady open-loop load on a real `robustgate serve` with the default "
        f"bundle and pipeline (`{r['config']['serve_config']}`: backbone + MagNet L1, request mode): "
        f"{r['config']['rate']} requests/s of 1-{r['config']['max_batch']} Fashion-MNIST test images each, at most "
        f"{r['config']['max_inflight']} in flight. Every accepted answer is compared with ONNX Runtime on the backbone.",
        "",
        f"- Command: `{r['command']}` (server: `{r['server_command']}`)",
        f"- Started {r['started_utc']} UTC, {r['wall_s']:.0f} s; load average at start {r['loadavg_start']}, "
        f"at end {r['loadavg_end']} (2 cores shared with other engineers' jobs)",
        f"- Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; revision {r['machine']['robustgate_revision']}",
        "",
        "## Summary",
        "",
        f"| requests | OK | rejected by MagNet (PERMISSION_DENIED) | errors (any other status) | mismatched answers | "
        f"client-skipped ticks |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {s['requests']} | {s['ok']} | {s['rejected']} | {s['errors']} | {s['mismatches']} | {s['client_skipped']} |",
        "",
        f"- Resident memory of the server: {s['rss_start_mib']:.1f} MiB at start (idle), {s['rss_warm_mib']:.1f} MiB after "
        f"minute 1, {s['rss_end_mib']:.1f} MiB at the end: **growth {100 * s['rss_growth_warm']:+.2f}%** from the warm "
        f"value ({100 * s['rss_growth_start']:+.2f}% from the idle start). Target < {100 * TARGET_RSS_GROWTH:.0f}%: "
        f"**{'met' if s['rss_target_met'] else 'not met'}**.",
        f"- Latency drift: p99 of minute 1 {s['p99_first_ms']:.1f} ms, of the last minute {s['p99_last_ms']:.1f} ms; "
        f"p50 {s['p50_first_ms']:.1f} -> {s['p50_last_ms']:.1f} ms.",
        f"- After the run: server ready {r['ready_after']}, a known request answered correctly {r['final_answer_correct']}, "
        f"SIGTERM exit code {r['exit_code']}.",
        "",
        "## Per minute",
        "",
        "| minute | requests | statuses | p50 ms | p99 ms | mismatches | skipped | RSS MiB | load 1 min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in r["minutes"]:
        st = ", ".join(f"{k} {v}" for k, v in sorted(m["statuses"].items()))
        p50 = f"{m['p50_ms']:.1f}" if m["p50_ms"] is not None else "-"
        p99 = f"{m['p99_ms']:.1f}" if m["p99_ms"] is not None else "-"
        lines.append(f"| {m['minute']} | {m['requests']} | {st} | {p50} | {p99} | {m['mismatches']} | "
                     f"{m['client_skipped']} | {m['rss_mib']:.1f} | {m['loadavg'][0]:.2f} |")
    errs = [e for m in r["minutes"] for e in m["error_messages"]]
    if errs:
        lines += ["", "## First error messages", ""] + [f"- `{e}`" for e in errs[:10]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=common.REPO / "deploy" / "default.yaml")
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=10.0, help="client deadline per request, s")
    ap.add_argument("--pool", type=int, default=1000, help="distinct test images to draw from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nice", type=int, default=0, help="niceness added to the server process")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--name", default="hardening.soak")
    args = ap.parse_args(argv)

    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    load0 = common.loadavg()
    t0 = time.perf_counter()
    server = common.Serve(args.config, nice=args.nice)
    try:
        bundle = Bundle.load(common.REPO / server.config["bundle"])
        x, _ = common.test_images(args.pool, seed=args.seed)  # [P, 1, 28, 28]
        ref = common.served_answers(server.config, reference_logits(bundle, x))  # [P, K]: what it answers
        rss_start = common.rss_mib(server.pid)
        load = asyncio.run(run_load(server.url, server.model, x, ref, server.pid, args))
        rss_end = common.rss_mib(server.pid)
    finally:
        code = server.stop()
    minutes = load["minutes"]
    total: Counter = Counter()
    for m in minutes:
        total.update(m["statuses"])
    rss_warm = minutes[0]["rss_mib"]
    summary = {
        "requests": sum(total.values()), "ok": total["OK"], "rejected": total["PERMISSION_DENIED"],
        "errors": sum(v for k, v in total.items() if k not in ("OK", "PERMISSION_DENIED")),
        "statuses": dict(total), "mismatches": sum(m["mismatches"] for m in minutes),
        "client_skipped": sum(m["client_skipped"] for m in minutes),
        "rss_start_mib": rss_start, "rss_warm_mib": rss_warm, "rss_end_mib": rss_end,
        "rss_growth_warm": (rss_end - rss_warm) / rss_warm, "rss_growth_start": (rss_end - rss_start) / rss_start,
        "p50_first_ms": minutes[0]["p50_ms"], "p50_last_ms": minutes[-1]["p50_ms"],
        "p99_first_ms": minutes[0]["p99_ms"], "p99_last_ms": minutes[-1]["p99_ms"],
    }
    summary["rss_target_met"] = summary["rss_growth_warm"] < TARGET_RSS_GROWTH
    result = {
        "command": ("" if os.nice(0) == 0 else f"nice -n {os.nice(0)} ") + " ".join(["python", *sys.argv]) if argv is None else "soak.py " + " ".join(argv),
        "server_command": server.command, "started_utc": started, "wall_s": time.perf_counter() - t0,
        "loadavg_start": load0, "loadavg_end": common.loadavg(), "machine": common.machine(),
        "config": {"serve_config": str(Path(args.config).resolve().relative_to(common.REPO)), "minutes": args.minutes,
                   "rate": args.rate, "max_batch": args.max_batch, "max_inflight": args.max_inflight,
                   "timeout_s": args.timeout, "pool": args.pool, "seed": args.seed},
        "summary": summary, **load, "exit_code": code,
    }
    js, md = common.write_results(args.name, result, markdown(result), args.out_dir)
    print(f"wrote {js} and {md}")
    ok = summary["errors"] == 0 and summary["mismatches"] == 0 and load["ready_after"] and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
