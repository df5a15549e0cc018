"""What each purifier costs through the proxy: items/s of a real ``robustgate serve`` at batch-64
requests with the pipeline empty vs with one purifier stage, in interleaved rounds.

One ``robustgate serve`` subprocess per configuration (ONNX Runtime backend, dynamic batching on,
``max_batch_size`` 64) on 127.0.0.1; all are started first, then each round loads every
configuration in turn for ``--duration`` seconds (closed loop, ``--concurrency`` clients sending
batch-64 FP32 requests, bench/serving/loadgen.py) -- the order reverses every round so that a drift
in the machine's load does not favour one side. An idle server uses no CPU while another is
measured. Per round, a purifier's cost is ``1 - items/s(purifier) / items/s(empty)`` of the
same round; the report gives the median over rounds (target: <= 10% for the cheap purifiers) and
the items/s of every window, with the load average beside each.

What the requests carry (``--inputs``, one or more, measured in the same rounds against the same
servers): ``test``, the bundle's test images (its recipe's dataset), a different window of them
each round -- what a served classifier sees; ``perturbed``, the same images plus a random ±ε sign
pattern (ε = ``--eps``, clipped to [0, 1]): the high-frequency energy of an L∞ attack at that
budget, not an attack; ``uniform``, uniform noise in [0, 1), the worst case for a codec's entropy
coding. The backbone's cost does not depend on the pixels, a JPEG round trip's does (a noise
picture codes into twice the bytes of a test-image picture), so its cost is given per input.
Each of those is one payload sent over and over from one client, which a stateful stage
(``kind: stateful``) takes for retries and never searches its history for; ``stream`` is what it
sees from benign clients: each closed-loop client has its own identity (the ``x-client-id``
header) and sends the next of the recipe's training and test images with every request
(bench/serving/loadgen.py), so the histories fill and every query is searched.

    .venv/bin/python bench/defenses/proxy_cost.py --rounds 5 --inputs test,perturbed,uniform --out bench/results/defenses.proxy_cost
    .venv/bin/python bench/defenses/proxy_cost.py --bundle /tmp/std-diffusion --configs empty,diffusion \\
        --out bench/results/defenses.proxy_cost.diffusion

Configurations: ``empty``, ``jpeg``, ``noise``, ``bitdepth``, ``median`` (each purifier with its
default parameters), ``diffusion`` (the bundle's fitted ``diffusion`` stage with ``runtime: onnx``;
``--diffusion-params`` adds stage params), or ``name=<JSON>`` for anything else: a list of stages,
or ``{"stages": [...], "batching": {...}, "server": {...}, "limits": {...}}``; items are separated by
``;``. ``--redis`` starts a redis-server on a free loopback port for the run and writes its URL
wherever a configuration says ``$REDIS_URL`` (a shared store: ``"limits": {"per_client": {"budget":
1000000000, "store": {"kind": "redis", "url": "$REDIS_URL"}}}``), e.g.
``--configs 'empty,jpeg;jpeg-whole={"stages": [{"name": "jpeg", "kind": "jpeg", "action": "log"}],
"batching": {"overlap_front": false}}'``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "serving"))
import loadgen  # noqa: E402  (bench/ is not a package)
from run import Proxy, loadavg, machine  # noqa: E402

from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.models.data import recipe_splits  # noqa: E402

CHEAP = ("jpeg", "noise", "bitdepth", "median")
TARGET_CHEAP_COST = 0.10
TARGET_DIFFUSION_ITEMS_PER_S = 100.0
INPUTS = ("test", "perturbed", "uniform", "stream")


def stages_for(name: str, diffusion_params: dict) -> list[dict]:
    if name == "empty":
        return []
    if name in CHEAP:
        return [{"name": name, "kind": name, "action": "log", "params": {}}]
    if name == "diffusion":
        return [{"name": "diffusion", "kind": "diffusion", "action": "log",
                 "params": {"runtime": "onnx", **diffusion_params}}]
    raise ValueError(f"unknown configuration {name!r}; give name=<JSON> for a custom one")


def parse_configs(spec: str, diffusion_params: dict) -> dict[str, dict]:
    """``;``-separated items, each ``name[,name...]`` (known configurations) or ``name=<JSON>``: a
    list of stages, or an object with ``stages`` and ``batching`` (merged over the benchmark's
    batching section) -> name -> ``{"stages": [...], "batching": {...}}``."""
    out = {}
    for item in filter(None, spec.split(";")):
        name, sep, given = item.partition("=")
        if not sep:
            out.update({n: {"stages": stages_for(n, diffusion_params), "batching": {}} for n in item.split(",")})
            continue
        value = json.loads(given)
        out[name] = {"batching": {}, **value} if isinstance(value, dict) else {"stages": value, "batching": {}}
    if "empty" not in out:
        raise ValueError("--configs must include 'empty' (the reference)")
    return out


def payloads(kinds: list[str], bundle: Bundle, batch: int, rounds: int, eps: float) -> dict[str, list[np.ndarray]]:
    """kind -> one ``[batch, *input shape]`` float32 payload per round (module docstring)."""
    item_shape = tuple(bundle.input.shape)
    out = {}
    if "uniform" in kinds:
        out["uniform"] = [np.random.default_rng(r).random((batch, *item_shape), dtype=np.float32) for r in range(rounds)]
    if {"test", "perturbed", "stream"} & set(kinds):
        splits = recipe_splits(bundle.spec.backbone.recipe)
        test_x = splits.test_x.numpy()
        if tuple(test_x.shape[1:]) != item_shape or len(test_x) < batch:
            raise ValueError(f"the test set {tuple(test_x.shape)} does not fit batch-{batch} requests of {item_shape}")
        starts = [(r * batch) % (len(test_x) - batch + 1) for r in range(rounds)]
        out["test"] = [np.ascontiguousarray(test_x[s:s + batch], dtype=np.float32) for s in starts]
        out["perturbed"] = [np.clip(w + eps * np.sign(np.random.default_rng(1000 + r).standard_normal(w.shape)), 0.0, 1.0)
                            .astype(np.float32) for r, w in enumerate(out["test"])]
    if "stream" in kinds:  # one pool for every round: the clients' streams go on where they stopped
        out["stream"] = [np.ascontiguousarray(np.concatenate([splits.train_x.numpy(), test_x]), dtype=np.float32)] * rounds
    return {k: out[k] for k in kinds}


def stage_totals(proxy: Proxy) -> dict[str, float]:
    """The server's running totals: ``robustgate_stage_duration_seconds`` sum per stage (decode,
    queue, classify, each pipeline stage, encode) and ``robustgate_batch_size`` sum (items)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.config['server']['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "robustgate_stage_duration_seconds_sum":
                out[sample.labels["stage"]] = sample.value
            elif sample.name == "robustgate_batch_size_sum":
                out["items"] = sample.value
    return out


def stage_us_per_item(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The server's time per item answered in a window, by stage (µs; from two :func:`stage_totals`):
    where the served call's wall time goes, which the throughput alone does not say (a stage that
    holds the GIL delays the event loop; one in ONNX Runtime runs beside it)."""
    items = after.get("items", 0.0) - before.get("items", 0.0)
    return {k: 1e6 * (v - before.get(k, 0.0)) / items for k, v in after.items() if k != "items" and items > 0}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default")
    ap.add_argument("--configs", default="empty," + ",".join(CHEAP))
    ap.add_argument("--diffusion-params", default="{}", help="JSON params added to the diffusion stage")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds measured per window")
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each window")
    ap.add_argument("--batch", type=int, default=64, help="items per request")
    ap.add_argument("--concurrency", type=int, default=2, help="closed-loop clients")
    ap.add_argument("--clients", type=int, default=None,
                    help="--inputs stream: identities the closed-loop clients share (default: one each; fewer: "
                         "several requests of one identity in flight)")
    ap.add_argument("--intra-op-threads", type=int, default=0, help="backend ONNX Runtime threads (0 = default)")
    ap.add_argument("--inputs", default="test,uniform",
                    help=f"what the requests carry, comma-separated: {', '.join(INPUTS)} (module docstring)")
    ap.add_argument("--eps", type=float, default=0.1, help="the perturbed input's L-infinity budget")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "defenses.proxy_cost")
    ap.add_argument("--redis", action="store_true", help="start a redis-server for $REDIS_URL in --configs")
    args = ap.parse_args(argv)
    kinds = list(dict.fromkeys(filter(None, args.inputs.split(","))))
    if not kinds or set(kinds) - set(INPUTS):
        ap.error(f"--inputs: expected some of {', '.join(INPUTS)}, got {args.inputs!r}")
    if args.clients is not None and ("stream" not in kinds or not 1 <= args.clients <= args.concurrency):
        ap.error(f"--clients: identities of --inputs stream, 1 to --concurrency ({args.concurrency}); "
                 f"got {args.clients}" + ("" if "stream" in kinds else " without stream inputs"))
    if not args.redis:
        return measure(args, argv)
    sys.path.insert(0, str(REPO / "bench" / "stateful"))
    from cost import start_redis  # noqa: E402  (bench/stateful/cost.py)

    proc, url, workdir = start_redis()
    try:
        return measure(args, argv, args.configs.replace("$REDIS_URL", url))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, argv: list[str] | None, configs_spec: str | None = None) -> int:
    """main's measurement, with ``configs_spec`` (``--configs`` with $REDIS_URL filled in) when given."""
    configs = parse_configs(configs_spec or args.configs, json.loads(args.diffusion_params))
    kinds = list(dict.fromkeys(filter(None, args.inputs.split(","))))  # checked by main
    bundle = Bundle.load(args.bundle)
    item_shape = tuple(bundle.input.shape)
    data = payloads(kinds, bundle, args.batch, args.rounds, args.eps)
    started, load_start, uptime_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), loadavg(), uptime()
    windows: dict[str, dict[str, list[dict]]] = {kind: {name: [] for name in configs} for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="proxy-cost-") as tmp:
        servers = {}
        try:
            for name, conf in configs.items():
                servers[name] = Proxy(Path(tmp), args.bundle.resolve(), {
                    "backend": {"kind": "onnxruntime", "onnxruntime": {"intra_op_threads": args.intra_op_threads}},
                    "batching": {"enabled": True, "max_batch_size": 64, **conf["batching"]},
                    "pipeline": {"stages": conf["stages"], "verdict_mode": "item"},
                    **{key: conf[key] for key in ("server", "limits") if key in conf},
                }, None, bundle.name)
            order = list(configs)
            for r in range(args.rounds):
                for kind in kinds:
                    for name in (order if r % 2 == 0 else order[::-1]):
                        before, stages_before = loadavg(), stage_totals(servers[name])
                        res = loadgen.run_load(servers[name].url, bundle.name, bundle.input.name, item_shape,
                                               args.concurrency, batch=args.batch, warmup_s=args.warmup,
                                               duration_s=args.duration, server_pids={"server": servers[name].proc.pid},
                                               **({"pool": data[kind][r], "clients": args.clients} if kind == "stream"
                                                  else {"x": data[kind][r]}))
                        res.update(round=r, loadavg_before=before, loadavg_after=loadavg(),
                                   stage_us_per_item=stage_us_per_item(stages_before, stage_totals(servers[name])))
                        windows[kind][name].append(res)
                        print(json.dumps({"inputs": kind, "config": name, "round": r,
                                          "items_per_s": round(res["items_per_s"], 1), "errors": res["errors"],
                                          "load": res["loadavg_after"][0]}), flush=True)
        finally:
            for server in servers.values():
                server.stop()

    summary = {kind: summarize(ws, configs) for kind, ws in windows.items()}
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_start": uptime_start, "uptime_end": uptime(), "loadavg_start": load_start, "loadavg_end": loadavg(),
        "machine": machine(), "bundle": str(args.bundle), "batch": args.batch, "concurrency": args.concurrency,
        "clients": args.clients,
        "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
        "intra_op_threads": args.intra_op_threads, "inputs": kinds, "eps": args.eps, "redis": args.redis,
        "summary": summary, "windows": windows,
    }
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def summarize(windows: dict[str, list[dict]], configs: dict[str, dict]) -> dict[str, dict]:
    """config -> medians over the rounds of one input kind, each cost against ``empty``'s window of the
    same round; a configuration ``a+b`` whose ``a`` was measured too also against ``a``'s (what adding
    the stage ``b`` costs, without leaving ``empty``'s pass-through path)."""
    summary = {}
    for name, ws in windows.items():
        ips = [w["items_per_s"] for w in ws]
        entry = {"items_per_s_median": statistics.median(ips), "items_per_s": ips,
                 "p50_ms_median": statistics.median(w["p50_ms"] for w in ws if w["p50_ms"] is not None),
                 "server_cpu_cores_median": statistics.median(w["cpu_cores"]["server"] for w in ws),
                 "stage_us_per_item_median": {k: statistics.median(w["stage_us_per_item"].get(k, 0.0) for w in ws)
                                              for k in ws[0].get("stage_us_per_item", {})},
                 "errors": sum(sum(w["errors"].values()) for w in ws), **configs[name]}
        if name != "empty":
            costs = [1.0 - w["items_per_s"] / e["items_per_s"] for w, e in zip(ws, windows["empty"])]
            entry["cost_per_round"] = costs
            entry["cost_median"] = statistics.median(costs)
            base = name.rsplit("+", 1)[0] if "+" in name else None
            if base in windows:
                vs = [1.0 - w["items_per_s"] / b["items_per_s"] for w, b in zip(ws, windows[base])]
                entry.update(base=base, cost_vs_base_per_round=vs, cost_vs_base_median=statistics.median(vs))
            if name in CHEAP:
                entry["target"] = f"cost <= {TARGET_CHEAP_COST:.0%}"
                entry["target_met"] = entry["cost_median"] <= TARGET_CHEAP_COST
            elif name.startswith("diffusion"):
                entry["target"] = f">= {TARGET_DIFFUSION_ITEMS_PER_S:.0f} items/s"
                entry["target_met"] = entry["items_per_s_median"] >= TARGET_DIFFUSION_ITEMS_PER_S
        summary[name] = entry
    return summary


INPUT_LABELS = {"test": "`test` = the bundle's test images",
                "perturbed": "`perturbed` = the test images + a random ±{eps} sign pattern",
                "uniform": "`uniform` = uniform noise in [0, 1)",
                "stream": "`stream` = benign clients' streams: each closed-loop client its own identity, a new "
                          "training or test image with every request"}


def markdown(r: dict) -> str:
    lines = [
        "# Purifier cost through the proxy", "",
        f"`{r['command']}`, {r['started_utc']} to {r['finished_utc']}.", "",
        f"A real `robustgate serve` per configuration (bundle `{r['bundle']}`, ONNX Runtime backend, batching on, "
        f"max batch 64), closed loop of {r['concurrency']} clients sending batch-{r['batch']} FP32 requests, "
        f"{r['rounds']} interleaved rounds of {r['duration_s']} s windows (order reversed every other round).",
        f"Inputs (module docstring): {', '.join(INPUT_LABELS[k].format(eps=r['eps']) for k in r['inputs'])}"
        + (f"; the stream's clients share {r['clients']} identities, so each has about "
           f"{r['concurrency'] / r['clients']:g} requests in flight" if r.get("clients") else "") + ".",
        f"Machine: {r['machine']['cores']} cores shared with other jobs; `uptime` at start: `{r['uptime_start']}`; "
        f"at end: `{r['uptime_end']}`." + (" A redis-server on a free loopback port (`--redis`; on the same cores, "
                                            "its CPU not in the server's) for the configurations' `$REDIS_URL`."
                                            if r.get("redis") else ""), "",
        "| inputs | configuration | items/s (median) | items/s per round | cost vs empty (median) | "
        "cost of its last stage (median) | p50 ms | server CPU cores | target |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for kind, name, s in ((k, n, s) for k, per in r["summary"].items() for n, s in per.items()):
        cost = f"{100 * s['cost_median']:.1f}%" if "cost_median" in s else "(reference)"
        target = "" if "target" not in s else f"{s['target']}: {'met' if s['target_met'] else 'NOT met'}"
        per_round = ", ".join(f"{v:.0f}" for v in s["items_per_s"])
        last = f"{100 * s['cost_vs_base_median']:.1f}% (vs {s['base']})" if "cost_vs_base_median" in s else ""
        lines.append(f"| {kind} | {name} | {s['items_per_s_median']:.0f} | {per_round} | {cost} | {last} | "
                     f"{s['p50_ms_median']:.1f} | {s['server_cpu_cores_median']:.2f} | {target} |")
    errors = {f"{k}/{n}": s["errors"] for k, per in r["summary"].items() for n, s in per.items() if s["errors"]}
    lines += ["", f"Request errors: {errors or 'none'}.", "",
              "`empty` serves with no stage, so it takes the pass-through path (one backend call per batch, "
              "`PipelineRunner.passthrough`); every other configuration runs the pipeline, so its cost vs empty "
              "includes leaving that path. `cost of its last stage`: a configuration `a+b` against `a` in the same "
              "rounds."]
    stages = list(dict.fromkeys(k for per in r["summary"].values() for s in per.values()
                                for k in s.get("stage_us_per_item_median", {})))
    if stages:
        lines += ["", "Where the server's time per item goes (`robustgate_stage_duration_seconds` over each window / items "
                  "answered, median over the rounds, µs; wall time of each stage, so the stages of one batch overlap "
                  "neither each other nor the queue, but the event loop's work for other requests runs beside them):", "",
                  "| inputs | configuration | " + " | ".join(stages) + " |", "| --- | --- |" + " ---: |" * len(stages)]
        for kind, per in r["summary"].items():
            for name, s in per.items():
                got = s.get("stage_us_per_item_median", {})
                lines.append(f"| {kind} | {name} | " + " | ".join(f"{got[k]:.1f}" if k in got else "" for k in stages) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
