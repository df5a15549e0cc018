"""A burst at a cold start: how many calls the queue-wait admission refuses when a freshly started
``robustgate serve`` (deploy/default.yaml, bundles/default) meets a burst of concurrent batch-1 calls
as soon as it says ready -- a rollout or a scale-up behind a load balancer that already has the
traffic -- with ``server.warmup`` on and off (proxy/warmup.py).

Per start: a fresh server (one worker process, its default otherwise), the moment ServerReady is
true a burst of ``--burst`` calls at once over ``--channels`` connections (Fashion-MNIST test images,
raw FP32, what tritonclient sends), then, once every answer is in, the same burst again (the warm
reference). Recorded per burst: answers by status (OK, PERMISSION_DENIED = a MagNet rejection, both a
full pipeline run; RESOURCE_EXHAUSTED = refused by the admission), the p50 and p99 latency of the
served calls, and the admission's messages. ``--starts`` starts per arm, arms interleaved; the whole
set once on the quiet machine and, with ``--neighbour``, once more beside a process that keeps one
core busy (a noisy neighbour on the node: the load the serving records saw when these refusals first
showed, bench/results/serving.workers.md).

    .venv/bin/python bench/hardening/cold_burst.py --neighbour    # ~6 min

Writes bench/results/hardening.cold_burst.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc  # noqa: E402

ARMS = {"warmup": True, "no_warmup": False}
CONFIG = common.REPO / "deploy" / "default.yaml"


async def burst(url: str, requests: list, channels: int) -> dict:
    """All of ``requests`` at once over ``channels`` connections -> outcome counts, served latencies,
    the admission's distinct messages."""
    opened = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in opened]
    codes: Counter = Counter()
    served: list[float] = []
    messages: set[str] = set()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            await stubs[i % channels].ModelInfer(requests[i], timeout=60)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if code == "RESOURCE_EXHAUSTED":
                messages.add(exc.details().split(" (")[0].split(": the")[0])
        codes[code] += 1
        if code in ("OK", "PERMISSION_DENIED"):
            served.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(one(i) for i in range(len(requests))))
    finally:
        for ch in opened:
            await ch.close()
    return {"codes": dict(codes), "refused": codes.get("RESOURCE_EXHAUSTED", 0),
            "served_p50_ms": common.percentile_ms(served, 50), "served_p99_ms": common.percentile_ms(served, 99),
            "messages": sorted(messages)}


def one_start(arm: str, requests: list, channels: int) -> dict:
    server = common.Serve(CONFIG, overrides={"server": {"workers": 1, "warmup": ARMS[arm]}})
    try:
        cold = asyncio.run(burst(server.url, requests, channels))
        warm = asyncio.run(burst(server.url, requests, channels))
    finally:
        server.stop()
    return {"arm": arm, "cold": cold, "warm": warm}


def summary(runs: list[dict], arm: str, phase: str) -> dict:
    rs = [r[phase] for r in runs if r["arm"] == arm]
    refused = [r["refused"] for r in rs]
    p99 = [r["served_p99_ms"] for r in rs if r["served_p99_ms"] is not None]
    return {"starts": len(rs), "refused_total": int(sum(refused)), "refused_per_burst": refused,
            "bursts_with_refusals": sum(1 for n in refused if n),
            "served_p99_ms_median": float(np.median(p99)) if p99 else None}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(data["conditions"])
    fig, axes = plt.subplots(1, len(conditions), figsize=(5 * len(conditions), 3.6), squeeze=False, sharey=True)
    for ax, cond in zip(axes[0], conditions):
        labels, values = [], []
        for arm in ARMS:
            for phase in ("cold", "warm"):
                labels.append(f"{arm}\n{phase}")
                values.append(data["conditions"][cond]["summary"][arm][phase]["refused_per_burst"])
        for i, v in enumerate(values):
            ax.scatter(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, s=18)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{cond}: refused of {data['burst']} per burst", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=5, help="fresh servers per arm and condition")
    ap.add_argument("--burst", type=int, default=160, help="calls at once")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--neighbour", action="store_true", help="also run beside a process that keeps one core busy")
    ap.add_argument("--out", default="hardening.cold_burst")
    args = ap.parse_args(argv)

    images, _ = common.test_images(args.burst, seed=0)
    requests = [common.infer_request("default", images[i:i + 1]) for i in range(args.burst)]
    args_given = argv if argv is not None else sys.argv[1:]
    data = {"command": " ".join(["python", "bench/hardening/cold_burst.py", *args_given]),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": common.machine(),
            "load_average_start": common.loadavg(), "config": str(CONFIG.relative_to(common.REPO)),
            "burst": args.burst, "channels": args.channels, "conditions": {}}
    conditions = ["quiet"] + (["neighbour"] if args.neighbour else [])
    for cond in conditions:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "neighbour" else None
        try:
            runs = []
            for k in range(args.starts):
                for arm in (ARMS if k % 2 == 0 else reversed(list(ARMS))):  # interleaved, order alternating
                    runs.append(one_start(arm, requests, args.channels))
                    r = runs[-1]
                    print(f"[{cond}] start {k + 1}/{args.starts} {arm}: cold refused {r['cold']['refused']}, "
                          f"warm refused {r['warm']['refused']}", flush=True)
        finally:
            if hog is not None:
                hog.kill()
        data["conditions"][cond] = {"runs": runs, "summary": {
            arm: {phase: summary(runs, arm, phase) for phase in ("cold", "warm")} for arm in ARMS}}
    data["load_average_end"] = common.loadavg()

    m = data["machine"]
    lines = ["# A burst at a cold start: refusals with and without server.warmup", "",
             f"Command: `{data['command']}` (started {data['started_utc']}).", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, grpcio {m['grpcio']}; revision "
             f"{m['robustgate_revision']}; load average {data['load_average_start']} at the start, "
             f"{data['load_average_end']} at the end. Client and server share the cores.", "",
             f"Each start: a fresh `robustgate serve` with `{data['config']}` (one worker process), a burst of "
             f"{args.burst} batch-1 calls at once over {args.channels} connections the moment ServerReady is true "
             f"(`cold`), then the same burst again once every answer is in (`warm`). `neighbour`: the same beside a "
             f"process that keeps one core busy. Refused = RESOURCE_EXHAUSTED from the queue-wait admission "
             f"(batching.max_queue_wait_ms 100); served = OK or a MagNet rejection, both a full pipeline run.", "",
             "| condition | server.warmup | burst | starts | refused in all | bursts with refusals | refused per burst "
             "| served p99 ms (median) |", "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for cond in conditions:
        for arm in ARMS:
            for phase in ("cold", "warm"):
                s = data["conditions"][cond]["summary"][arm][phase]
                p99 = "-" if s["served_p99_ms_median"] is None else f"{s['served_p99_ms_median']:.0f}"
                lines.append(f"| {cond} | {'on' if ARMS[arm] else 'off'} | {phase} | {s['starts']} | "
                             f"{s['refused_total']} of {s['starts'] * args.burst} | {s['bursts_with_refusals']} | "
                             f"{', '.join(map(str, s['refused_per_burst']))} | {p99} |")
    messages = sorted({m for c in conditions for r in data["conditions"][c]["runs"] for p in ("cold", "warm")
                       for m in r[p]["messages"]})
    lines += ["", "Refusal messages seen: " + ("; ".join(f"`{m}`" for m in messages) if messages else "none") + ".",
              "", f"![refusals per burst]({args.out}.png)", ""]
    js, md = common.write_results(args.out, data, "\n".join(lines))
    plot(data, js.with_suffix(".png"))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
