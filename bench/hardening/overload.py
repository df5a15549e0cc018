"""Overload: open-loop load far above capacity against a real ``robustgate serve`` with the default bundle.

Three phases per run, each request 1..``--max-batch`` Fashion-MNIST test images (raw FP32, what
tritonclient sends) on one gRPC channel:

1. baseline: ``--base-rate`` requests/s for ``--base-s`` seconds (well below capacity);
2. overload: ``--rate`` requests/s for ``--overload-s`` seconds (far above capacity: open loop, the
   sender does not wait for answers; at most ``--max-inflight`` outstanding, a tick finding them all
   busy is counted as ``client_skipped``);
3. recovery: ``--base-rate`` again for ``--recovery-s`` seconds, once the overload's answers are in.

Recorded per second: requests sent, answers by status, p50/p99 latency of served answers (OK, and
PERMISSION_DENIED = a MagNet rejection, also a full pipeline run) and of RESOURCE_EXHAUSTED refusals,
the server's resident memory (VmRSS) and its queue depth (robustgate_queue_depth from /metrics). Every
OK answer is compared with ONNX Runtime on the backbone (a wrong or swapped answer is a mismatch). A
run is made per ``--queue-items`` value (``batching.max_queue_items``, a fresh server each): the
shipped default (1024) and a queue sized to the latency objective.

Targets (issue 9, item 3), as checked here: refusals are quick (p99 <= 50 ms); served requests keep
the latency objective of deploy/prometheus (99% under 250 ms) during the overload; memory is bounded
(RSS at the end of the overload within 10% of the end of the baseline); recovery: no refusal and the
objective met again in the recovery phase.

    nice -n 5 .venv/bin/python bench/hardening/overload.py    # ~3 min

Writes bench/results/hardening.overload.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from soak import reference_logits  # noqa: E402

from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2 as pb  # noqa: E402
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

SLO_S = 0.250  # deploy/prometheus/robustgate.rules.yml: 99% of calls under 250 ms
REFUSAL_TARGET_S = 0.050
RSS_TARGET = 0.10
SERVED = ("OK", "PERMISSION_DENIED")


def scrape(port: int) -> dict:
    """The server's queue depth and requests_total by outcome."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {"queue_depth": None, "requests": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "robustgate_queue_depth":
                out["queue_depth"] = s.value
            elif s.name == "robustgate_requests_total":
                out["requests"][s.labels["outcome"]] = s.value
    return out


def new_second(phase: str, t: int) -> dict:
    return {"phase": phase, "t": t, "sent": 0, "statuses": Counter(), "served_s": [], "refused_s": [],
            "client_skipped": 0, "mismatches": 0}


async def run_load(server: common.Serve, x: np.ndarray, ref: np.ndarray, args) -> dict:
    rng = random.Random(args.seed)
    buckets: dict[tuple[str, int], dict] = {}  # (phase, whole second since start) -> tallies
    current = "baseline"
    durations: dict[str, float] = {}  # phase -> seconds it lasted
    inflight = 0
    tasks: set[asyncio.Task] = set()
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()

    def second_of(now: float, phase: str) -> dict:
        """The tallies of ``phase`` in the current second (a second shared by two phases has two)."""
        key = (phase, int(now - t0))
        if key not in buckets:
            buckets[key] = new_second(*key)
        return buckets[key]

    async with grpc.aio.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(idx: np.ndarray, bucket: dict) -> None:
            nonlocal inflight
            start = time.perf_counter()
            try:
                resp = await stub.ModelInfer(common.infer_request(server.model, x[idx]), timeout=args.timeout)
                status = "OK"
            except grpc.aio.AioRpcError as exc:
                resp, status = None, exc.code().name
                if status not in SERVED + ("RESOURCE_EXHAUSTED",) and len(errors) < 10:
                    errors.append(f"{status} after {time.perf_counter() - start:.2f} s: {exc.details()}")
            finally:
                inflight -= 1
            took = time.perf_counter() - start
            bucket["statuses"][status] += 1
            if status in SERVED:
                bucket["served_s"].append(took)
            elif status == "RESOURCE_EXHAUSTED":
                bucket["refused_s"].append(took)
            if resp is not None:
                got = common.logits_of(resp)
                if got.shape != ref[idx].shape or not np.allclose(got, ref[idx], rtol=1e-4, atol=1e-4):
                    bucket["mismatches"] += 1

        async def sample() -> None:  # once a second: RSS and the server's queue depth
            while True:
                b = second_of(time.perf_counter(), current)
                b["rss_mib"] = common.rss_mib(server.pid)
                b["queue_depth"] = (await loop.run_in_executor(None, scrape, server.metrics_port))["queue_depth"]
                await asyncio.sleep(1.0)

        async def phase(name: str, rate: float, duration: float) -> None:
            nonlocal inflight, current
            current = name
            start = time.perf_counter()
            period, k = 1.0 / rate, 0
            while True:
                t = start + k * period
                if t >= start + duration:
                    durations[name] = time.perf_counter() - start
                    return
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                k += 1
                bucket = second_of(time.perf_counter(), name)
                if inflight >= args.max_inflight:
                    bucket["client_skipped"] += 1
                    continue
                n = rng.randint(1, args.max_batch)
                idx = np.asarray(rng.sample(range(len(x)), n))
                inflight += 1
                bucket["sent"] += 1
                task = loop.create_task(one(idx, bucket))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        sampler = loop.create_task(sample())
        before = await loop.run_in_executor(None, scrape, server.metrics_port)
        await phase("baseline", args.base_rate, args.base_s)
        await phase("overload", args.rate, args.overload_s)
        drain_start = time.perf_counter()
        current = "drain"
        while tasks:  # the overload's answers come in before recovery starts
            await asyncio.sleep(0.05)
        drain_s = time.perf_counter() - drain_start
        await phase("recovery", args.base_rate, args.recovery_s)
        if tasks:
            await asyncio.gather(*tasks)
        sampler.cancel()
        after = await loop.run_in_executor(None, scrape, server.metrics_port)
        ready = (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
    server_counts = {k: after["requests"].get(k, 0) - before["requests"].get(k, 0) for k in after["requests"]}
    order = {"baseline": 0, "overload": 1, "drain": 2, "recovery": 3}
    seconds = [buckets[k] for k in sorted(buckets, key=lambda k: (k[1], order[k[0]]))]
    return {"seconds": seconds, "durations": durations, "drain_s": drain_s, "errors": errors, "server_requests": server_counts,
            "ready_after": bool(ready)}


def summarize_phase(seconds: list[dict], name: str, duration_s: float) -> dict:
    rows = [s for s in seconds if s["phase"] == name]
    statuses: Counter = Counter()
    for s in rows:
        statuses.update(s["statuses"])
    served = [v for s in rows for v in s["served_s"]]
    refused = [v for s in rows for v in s["refused_s"]]
    dur = duration_s
    return {
        "seconds": duration_s, "sent": sum(s["sent"] for s in rows), "sent_per_s": sum(s["sent"] for s in rows) / dur,
        "statuses": dict(statuses), "served_per_s": len(served) / dur,
        "served_p50_ms": common.percentile_ms(served, 50), "served_p99_ms": common.percentile_ms(served, 99),
        "served_over_slo": float(np.mean(np.asarray(served) > SLO_S)) if served else None,
        "refused_p50_ms": common.percentile_ms(refused, 50), "refused_p99_ms": common.percentile_ms(refused, 99),
        "refused_max_ms": float(max(refused) * 1e3) if refused else None,
        "client_skipped": sum(s["client_skipped"] for s in rows), "mismatches": sum(s["mismatches"] for s in rows),
        "rss_mib_last": next((s["rss_mib"] for s in reversed(rows) if "rss_mib" in s), None),
        "rss_mib_max": max((s["rss_mib"] for s in rows if "rss_mib" in s), default=None),
        "queue_depth_max": max((s["queue_depth"] for s in rows if s.get("queue_depth") is not None), default=None),
    }


def one_run(queue_items: int, x: np.ndarray, args) -> dict:
    overrides = {"batching": {"max_queue_items": queue_items}}
    if queue_items < 256:  # limits.max_batch_items must fit the queue; the load sends <= max_batch items
        overrides["limits"] = {"max_batch_items": min(queue_items, 64)}
    server = common.Serve(args.config, overrides=overrides, nice=args.nice)
    try:
        bundle = Bundle.load(common.REPO / server.config["bundle"])
        served_bundle = {"name": bundle.name, "backbone_sha256": bundle.spec.backbone.onnx.sha256[:12],
                         "defenses": {n: {"threshold": d.threshold, "width": d.params.get("width"),
                                          "sha256": {r: a.sha256[:12] for r, a in d.files.items()}}
                                      for n, d in bundle.spec.defenses.items()}}
        ref = reference_logits(bundle, x)  # [P, K]
        rss_idle = common.rss_mib(server.pid)
        load = asyncio.run(run_load(server, x, ref, args))
        alive = server.alive()
    finally:
        code = server.stop()
    phases = {p: summarize_phase(load["seconds"], p, load["durations"][p]) for p in ("baseline", "overload", "recovery")}
    client_refused = sum(s["statuses"].get("RESOURCE_EXHAUSTED", 0) for s in load["seconds"])
    other: Counter = Counter()
    for s in load["seconds"]:
        other.update({k: v for k, v in s["statuses"].items() if k not in SERVED + ("RESOURCE_EXHAUSTED",)})
    b, o, r = phases["baseline"], phases["overload"], phases["recovery"]
    rss_growth = (o["rss_mib_last"] - b["rss_mib_last"]) / b["rss_mib_last"]
    checks = {
        "refusals_quick": o["refused_p99_ms"] is not None and o["refused_p99_ms"] <= REFUSAL_TARGET_S * 1e3,
        "served_slo_in_overload": o["served_over_slo"] is not None and o["served_over_slo"] <= 0.01,
        "memory_bounded": rss_growth <= RSS_TARGET,
        "recovered": r["statuses"].get("RESOURCE_EXHAUSTED", 0) == 0 and r["served_over_slo"] is not None
                     and r["served_over_slo"] <= 0.01,
        "no_mismatch": all(p["mismatches"] == 0 for p in phases.values()),
        "no_other_status": not other,
        # every answer the server's handler gave is counted; CANCELLED ones never reached it
        "server_counted_every_answer": sum(load["server_requests"].values())
        == sum(sum(s["statuses"].values()) for s in load["seconds"]) - other.get("CANCELLED", 0),
    }
    return {
        "queue_items": queue_items, "server_command": server.command, "bundle": served_bundle, "rss_idle_mib": rss_idle,
        "rss_growth_overload": rss_growth, "phases": phases, "drain_s": load["drain_s"],
        "client_refused": client_refused, "server_refused": load["server_requests"].get("resource_exhausted"),
        "server_requests": load["server_requests"], "server_total": sum(load["server_requests"].values()),
        "client_total": sum(sum(s["statuses"].values()) for s in load["seconds"]),
        "other_statuses": dict(other), "other_errors": load["errors"],
        "ready_after": load["ready_after"],
        "alive_after": alive, "exit_code": code, "checks": checks,
        "timeline": [{k: (dict(v) if isinstance(v, Counter) else v) for k, v in s.items()
                      if k not in ("served_s", "refused_s")}
                     | {"served_p99_ms": common.percentile_ms(s["served_s"], 99),
                        "refused_p99_ms": common.percentile_ms(s["refused_s"], 99)} for s in load["seconds"]],
    }


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Hardening: overload",
        "",
        f"Open-loop load far above capacity on a real `robustgate serve` with `{c['serve_config']}` (default bundle: "
        f"backbone + MagNet L1, request mode), one run per `batching.max_queue_items`. Phases: baseline "
        f"{c['base_rate']:.0f} requests/s for {c['base_s']:.0f} s, overload {c['rate']:.0f} requests/s for "
        f"{c['overload_s']:.0f} s, recovery {c['base_rate']:.0f} requests/s for {c['recovery_s']:.0f} s; each request "
        f"1-{c['max_batch']} Fashion-MNIST test images; at most {c['max_inflight']} in flight. Served = OK or "
        f"PERMISSION_DENIED (a MagNet rejection: the whole pipeline ran). Every OK answer is compared with ONNX "
        f"Runtime on the backbone.",
        "",
        f"- Command: `{r['command']}`",
        f"- Started {r['started_utc']} UTC, {r['wall_s']:.0f} s; load average at start {r['loadavg_start']}, at end "
        f"{r['loadavg_end']} (2 cores shared with other jobs; the load generator runs on the same 2 cores, so the "
        f"latencies include its own scheduling delays)",
        f"- Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; revision {r['machine']['robustgate_revision']}",
        f"- Bundle served: " + "; ".join(
            f"{run['bundle']['name']} (backbone {run['bundle']['backbone_sha256']}…, "
            + ", ".join(f"{n} width {d['width']} threshold {d['threshold']:.4g}, artifacts "
                        + " ".join(f"{v}…" for v in d['sha256'].values()) for n, d in run['bundle']['defenses'].items())
            + f") for max_queue_items {run['queue_items']}" for run in r["runs"]),
        f"- Targets as checked: refusal p99 <= {REFUSAL_TARGET_S * 1e3:.0f} ms; served share over {SLO_S * 1e3:.0f} ms "
        f"<= 1% during the overload (the latency objective of deploy/prometheus); RSS at the end of the overload within "
        f"{RSS_TARGET * 100:.0f}% of the end of the baseline; recovery phase without refusals and within the objective.",
        "",
        "## Summary",
        "",
        "| max_queue_items | phase | sent/s | served/s | refused | served p50 / p99 ms | served > 250 ms | "
        "refusal p50 / p99 / max ms | max queue depth | RSS MiB (end) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in r["runs"]:
        for name, p in run["phases"].items():
            over = "-" if p["served_over_slo"] is None else f"{100 * p['served_over_slo']:.1f}%"
            lines.append(
                f"| {run['queue_items']} | {name} | {p['sent_per_s']:.0f} | {p['served_per_s']:.0f} | "
                f"{p['statuses'].get('RESOURCE_EXHAUSTED', 0):,} | {_ms(p['served_p50_ms'])} / {_ms(p['served_p99_ms'])} | "
                f"{over} | {_ms(p['refused_p50_ms'])} / {_ms(p['refused_p99_ms'])} / {_ms(p['refused_max_ms'])} | "
                f"{_ms(p['queue_depth_max'])} | {_ms(p['rss_mib_last'])} |")
    lines += ["", "| max_queue_items | refusals quick | served within objective under overload | memory bounded "
              "(RSS growth) | recovered | mismatches | other statuses | refusals client / server | answers counted by "
              "the server / by the client (without CANCELLED) | drain s | ready, exit code |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    yes = {True: "**met**", False: "**not met**"}
    for run in r["runs"]:
        ch = run["checks"]
        mism = sum(p["mismatches"] for p in run["phases"].values())
        lines.append(
            f"| {run['queue_items']} | {yes[ch['refusals_quick']]} | {yes[ch['served_slo_in_overload']]} | "
            f"{yes[ch['memory_bounded']]} ({100 * run['rss_growth_overload']:+.1f}%) | {yes[ch['recovered']]} | {mism} | "
            f"{', '.join(f'{k} {v:,}' for k, v in run['other_statuses'].items()) or 0} | "
            f"{run['client_refused']:,} / {run['server_refused']:,.0f} | {run['server_total']:,.0f} / "
            f"{run['client_total'] - run['other_statuses'].get('CANCELLED', 0):,} | {run['drain_s']:.1f} | "
            f"{run['ready_after']}, {run['exit_code']} |")
    for run in r["runs"]:
        lines += ["", f"## Timeline, max_queue_items {run['queue_items']} (5-second windows)", "",
                  "| s | phase | sent | served | refused | served p99 ms | refusal p99 ms | queue depth | RSS MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        windows: dict[int, list[dict]] = {}
        for s in run["timeline"]:
            windows.setdefault(s["t"] // 5, []).append(s)
        for i, w in sorted(windows.items()):
            st: Counter = Counter()
            for s in w:
                st.update(s["statuses"])
            p99s = [s["served_p99_ms"] for s in w if s["served_p99_ms"] is not None]
            r99s = [s["refused_p99_ms"] for s in w if s["refused_p99_ms"] is not None]
            depth = [s["queue_depth"] for s in w if s.get("queue_depth") is not None]
            rss = [s["rss_mib"] for s in w if "rss_mib" in s]
            lines.append(
                f"| {5 * i}-{5 * i + 5} | {'+'.join(dict.fromkeys(s['phase'] for s in w))} | {sum(s['sent'] for s in w)} | "
                f"{sum(st[k] for k in SERVED)} | {st['RESOURCE_EXHAUSTED']} | {_ms(max(p99s) if p99s else None)} | "
                f"{_ms(max(r99s) if r99s else None)} | {_ms(max(depth) if depth else None)} | {_ms(rss[-1] if rss else None)} |")
        if run["other_errors"]:
            lines += ["", "First answers with another status:", ""] + [f"- `{e}`" for e in run["other_errors"]]
    if any("CANCELLED" in run["other_statuses"] for run in r["runs"]):
        lines += ["", "CANCELLED answers were never seen by robustgate's handler (the server's request counter equals the "
                  "client's answers without them): gRPC's own backlog protection (`grpc.server.max_pending_requests`, "
                  "1,000 calls waiting for the event loop by default, 3,000 hard) resets calls at random while more than "
                  "that are pending. See docs/PROTOCOL.md, \"Status codes\"."]
    lines += ["", "Per-window served p99 is the largest per-second p99 in the window; the per-second figures are in the "
              "JSON file."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=common.REPO / "deploy" / "default.yaml")
    ap.add_argument("--queue-items", type=int, nargs="+", default=[1024, 64],
                    help="batching.max_queue_items per run (default: the shipped 1024, then 64)")
    ap.add_argument("--base-rate", type=float, default=40.0, help="requests/s in the baseline and recovery phases")
    ap.add_argument("--rate", type=float, default=1500.0, help="requests/s in the overload phase")
    ap.add_argument("--base-s", type=float, default=15.0)
    ap.add_argument("--overload-s", type=float, default=45.0)
    ap.add_argument("--recovery-s", type=float, default=20.0)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-inflight", type=int, default=4096)
    ap.add_argument("--timeout", type=float, default=30.0, help="client deadline per request, s")
    ap.add_argument("--pool", type=int, default=1000, help="distinct test images to draw from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nice", type=int, default=0, help="niceness added to the server process")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--name", default="hardening.overload")
    args = ap.parse_args(argv)

    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    load0, t0 = common.loadavg(), time.perf_counter()
    x, _ = common.test_images(args.pool, seed=args.seed)  # [P, 1, 28, 28]
    runs = []
    for q in args.queue_items:
        runs.append(one_run(q, x, args))
        p = runs[-1]["phases"]["overload"]
        print(f"max_queue_items {q}: overload sent {p['sent_per_s']:.0f}/s served {p['served_per_s']:.0f}/s "
              f"p99 {_ms(p['served_p99_ms'])} ms refusal p99 {_ms(p['refused_p99_ms'])} ms checks {runs[-1]['checks']}",
              flush=True)
    result = {
        "command": ("" if os.nice(0) == 0 else f"nice -n {os.nice(0)} ") + " ".join(["python", *sys.argv])
        if argv is None else "overload.py " + " ".join(argv),
        "started_utc": started, "wall_s": time.perf_counter() - t0, "loadavg_start": load0,
        "loadavg_end": common.loadavg(), "machine": common.machine(),
        "config": {"serve_config": str(Path(args.config).resolve().relative_to(common.REPO)), "rate": args.rate,
                   "base_rate": args.base_rate, "base_s": args.base_s, "overload_s": args.overload_s,
                   "recovery_s": args.recovery_s, "max_batch": args.max_batch, "max_inflight": args.max_inflight,
                   "timeout_s": args.timeout, "pool": args.pool, "seed": args.seed, "queue_items": args.queue_items},
        "targets": {"refusal_p99_ms": REFUSAL_TARGET_S * 1e3, "slo_ms": SLO_S * 1e3, "rss_growth": RSS_TARGET},
        "runs": runs,
    }
    js, md = common.write_results(args.name, result, markdown(result), args.out_dir)
    print(f"wrote {js} and {md}")
    ok = all(run["checks"]["no_mismatch"] and run["checks"]["no_other_status"] and run["ready_after"]
             and run["exit_code"] == 0 for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
