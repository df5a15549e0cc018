"""CPU time per served item of the stateful k-NN stage inside the proxy's batch call (issue 22 target:
the stage costs <= 10% of proxy throughput at concurrency 16; bench/results/defenses.proxy_cost.stateful.md).

The runner is built as ``robustgate serve`` builds it (proxy/serve.py ``make_backend`` and
``local_classifier``, defenses/assemble.py ``build_runner``; ONNX Runtime backend with the config's
defaults, torch pinned to one thread) for ``--bundle`` with two pipelines: ``magnet`` (the fitted
``magnet_l1``, runtime onnx, action reject) and ``magnet+knn`` (the same plus the fitted
``stateful_knn``, action log). The k-NN store is first filled with ``--history`` earlier queries
of each of ``--clients`` clients (the bundle's test images, each client its own random order), then
batches of ``--batch`` items, each from a different client (what a closed loop of that many
clients coalesces into), go through:

- ``whole``: the runner's batch call (``runner(x, clients=...)``), each pipeline (blocks interleaved;
  with the encoder fused, also the same stages with the encoder in its own session);
- ``fused pass``: the runner's one ONNX Runtime call (backbone + fused graphs), each pipeline;
- the k-NN parts on the same batches: ``digests`` (the batch's keyed retry digests; BLAKE2b per
  item before 2026-12-06), ``encoder`` (the stage's own ONNX Runtime session, as the unfused path
  runs it), ``store`` (``observe_batch`` on encoded rows), ``scores`` (``knn_scores`` and the
  tensors per client), ``store + scores`` (the
  call the pipeline makes: ``observe_rows``, or ``observe_groups`` before it existed), ``observe_clients``
  and ``run_stateful`` (the stage's whole step in the fused path, with the fused embedding when
  the pipeline is fused, else encoding itself).

CPU time is ``time.process_time`` (every thread of this process: ONNX Runtime's pool included)
over ``--calls`` calls, per item; the median over ``--blocks`` blocks is reported. A second traffic
shape, ``retry``, repeats what bench/defenses/proxy_cost.py sends: one client (its 16 workers share
one channel, so one peer identity) resending one image, every query after the first an exact retry.
A cProfile of the ``magnet+knn`` batch call (benign traffic) closes the report.

    nice -n 10 python bench/stateful/stage_cpu.py [--out bench/results/stateful.stage_cpu] [--compare EARLIER.json]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "hardening"))
from common import machine  # noqa: E402

from robustgate.defenses.assemble import build_runner, pin_torch_threads  # noqa: E402
from robustgate.defenses.pipeline import observe_clients, run_stateful  # noqa: E402
from robustgate.defenses.stateful.blacklight import digests  # noqa: E402
from robustgate.defenses.stateful.knn import knn_scores  # noqa: E402
from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.models.data import recipe_splits  # noqa: E402
from robustgate.proxy.config import ProxyConfig  # noqa: E402
from robustgate.proxy.serve import local_classifier, make_backend  # noqa: E402

# parts renamed since an earlier run (--compare): name now -> name then
EARLIER_NAMES = {"store + scores (the pipeline's call)": "observe_groups (store + scores)"}
MAGNET = {"name": "magnet_l1", "kind": "magnet", "action": "reject", "params": {"runtime": "onnx"}}
KNN = {"name": "stateful_knn", "kind": "stateful", "action": "log"}


def build(bundle_path: Path, bundle: Bundle, stages: list[dict]):
    cfg = ProxyConfig.model_validate({"bundle": str(bundle_path), "pipeline": {"stages": stages}})
    backend = make_backend(cfg, bundle)
    return build_runner(cfg.pipeline, bundle, backend, local_classifier(cfg, bundle, backend))


class Stream:
    """Benign traffic: batches of ``batch`` items, item ``j`` of a batch from client ``(start + j) %
    clients``, each client walking its own permutation of ``images`` (fresh images, no retries)."""

    def __init__(self, images: np.ndarray, clients: int, batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images, self.clients, self.batch = images, clients, batch
        self.order = [rng.permutation(len(images)) for _ in range(clients)]
        self.pos = [0] * clients
        self.start = 0

    def take(self, client: int, n: int) -> np.ndarray:
        at = self.pos[client]
        if at + n > len(self.images):
            raise RuntimeError("the stream ran out of fresh images; lower --history, --blocks or --calls")
        self.pos[client] = at + n
        return self.images[self.order[client][at:at + n]]

    def next(self) -> tuple[np.ndarray, list[str]]:
        ids = [(self.start + j) % self.clients for j in range(self.batch)]
        self.start = (self.start + self.batch) % self.clients
        x = np.concatenate([self.take(c, 1) for c in ids])  # [B, C, H, W]
        return np.ascontiguousarray(x, dtype=np.float32), [f"peer:client-{c}" for c in ids]


def interleaved(variants: dict, blocks: int, calls: int, items: int) -> dict[str, dict]:
    """``variants``: name -> ``(call, make)``; per block, each variant's ``call(arg)`` on ``calls`` fresh
    ``make()`` args (made before its timer), the variants one after the other (reversed every other
    block, so that a drift in the machine's load favours none) -> name -> the median over blocks of
    CPU and wall microseconds per item."""
    cpu = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    names = list(variants)
    for block in range(blocks):
        for name in (names if block % 2 == 0 else names[::-1]):
            call, make = variants[name]
            args = [make() for _ in range(calls)]
            c0, w0 = time.process_time(), time.perf_counter()
            for a in args:
                call(a)
            cpu[name].append((time.process_time() - c0) / (calls * items) * 1e6)
            wall[name].append((time.perf_counter() - w0) / (calls * items) * 1e6)
    return {name: {"cpu_us_per_item": statistics.median(cpu[name]), "wall_us_per_item": statistics.median(wall[name]),
                   "cpu_us_per_item_blocks": [round(v, 2) for v in cpu[name]]} for name in names}


def cpu_us_per_item(call, make, blocks: int, calls: int, items: int) -> dict:
    """One variant of :func:`interleaved`."""
    return interleaved({"": (call, make)}, blocks, calls, items)[""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(REPO / "bundles" / "default"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--history", type=int, default=3000, help="earlier queries per client in the store")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--calls", type=int, default=25)
    ap.add_argument("--profile-calls", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stateful.stage_cpu"))
    ap.add_argument("--compare", help="an earlier run's JSON (e.g. from git history): its figures in a column beside")
    args = ap.parse_args(argv)
    pin_torch_threads()  # as robustgate serve

    bundle_path = Path(args.bundle)
    bundle = Bundle.load(bundle_path)
    images = recipe_splits(bundle.spec.backbone.recipe).test_x.numpy().astype(np.float32)  # [10000, C, H, W]
    magnet = build(bundle_path, bundle, [MAGNET])
    both = build(bundle_path, bundle, [MAGNET, KNN])
    stage = next(s for s in both.stages if s.name == KNN["name"])
    det = stage.defense
    fused_embedding = both.fused is not None and KNN["name"] in both.fused.stages
    print(f"magnet fused_only={magnet.fused_only}; magnet+knn fused_only={both.fused_only}, "
          f"embedding in the fused pass={fused_embedding}", flush=True)

    # 1. history: each client's first --history images, one observe call per client
    stream = Stream(images, args.clients, args.batch)
    t0 = time.perf_counter()
    for c in range(args.clients):
        x = torch.from_numpy(stream.take(c, args.history))
        det.observe_groups([(f"peer:client-{c}", det.encode(x))])
    fill_s = time.perf_counter() - t0
    print(f"store filled: {det.store.stats()} in {fill_s:.1f} s", flush=True)

    b, kw = args.batch, {"blocks": args.blocks, "calls": args.calls, "items": args.batch}
    key, k = det.store.fingerprint_key(), det.k
    benign: dict[str, dict] = {}

    def measure(name: str, call, make) -> None:
        benign[name] = cpu_us_per_item(call, make, **kw)
        print(f"benign {name}: {benign[name]['cpu_us_per_item']:.1f} us CPU per item", flush=True)

    def encoded_groups():
        x, clients = stream.next()
        enc = det.encode(torch.from_numpy(x))
        return [(c, tuple(a[i:i + 1] for a in enc)) for i, c in enumerate(clients)]

    def store_groups():
        return [(c, d, e) for c, (d, e) in encoded_groups()]

    def distances():
        return det.store.observe_batch(store_groups(), k, time.time())

    def fused_args():
        x, clients = stream.next()
        return x, clients

    # 2. whole batch calls (interleaved) and the fused pass; with the encoder fused, also the same
    # stages with the encoder in its own session (the fused pass without it), on the same store
    whole = {"whole magnet": (lambda a: magnet(a[0], clients=a[1]), stream.next),
             "whole magnet+knn": (lambda a: both(a[0], clients=a[1]), stream.next)}
    if fused_embedding:
        det.onnx_embedding_model = lambda: None  # this instance only, while the second runner is built
        own = dataclasses.replace(both)
        del det.onnx_embedding_model
        whole["whole magnet+knn, encoder in its own session"] = (lambda a: own(a[0], clients=a[1]), stream.next)
    for name, r in interleaved(whole, **kw).items():
        benign[name] = r
        print(f"benign {name}: {r['cpu_us_per_item']:.1f} us CPU per item", flush=True)
    passes = {"fused pass magnet": (lambda a: magnet.fused(a[0]), stream.next),
              "fused pass magnet+knn": (lambda a: both.fused(a[0]), stream.next)}
    for name, r in interleaved(passes, **kw).items():
        benign[name] = r
        print(f"benign {name}: {r['cpu_us_per_item']:.1f} us CPU per item", flush=True)
    # 3. the k-NN parts
    measure("digests", lambda a: digests(torch.from_numpy(a[0]), key), stream.next)
    measure("encoder (own session)", lambda a: det.embed(torch.from_numpy(a[0])), stream.next)
    measure("encode (digests + own session)", lambda a: det.encode(torch.from_numpy(a[0])), stream.next)
    measure("store observe_batch", lambda g: det.store.observe_batch(g, k, time.time()), store_groups)
    measure("scores (knn_scores + tensors)",
            lambda ds: [torch.from_numpy(knn_scores(d, det.statistic)) for d in ds], distances)
    rows = getattr(det, "observe_rows", None)  # the pipeline's call (observe_groups before it existed)
    measure("store + scores (the pipeline's call)",
            (lambda g: rows(g, time.time())) if rows else (lambda g: det.observe_groups(g, time.time())), encoded_groups)

    def run_stage(a):
        x, clients, extra = a
        verdict, reason = [0] * b, [None] * b
        run_stateful([stage], torch.from_numpy(x), clients, verdict, reason, {}, {}, {}, lambda s: None, **extra)

    def stage_args():
        x, clients = stream.next()
        extra = {}
        if fused_embedding:  # the embedding as the fused path hands it over (computed outside the timer)
            extra = {"embeddings": {KNN["name"]: both.fused(x)[2][KNN["name"]]}}
        return x, clients, extra

    measure("observe_clients (own encoding)", lambda a: observe_clients(stage, torch.from_numpy(a[0]), a[1]),
            stream.next)
    measure("run_stateful (as the fused path)", run_stage, stage_args)
    history = {"clients": args.clients, "per_client_at_start": args.history,
               "per_client_at_end": det.store.stats()["entries"] // args.clients}

    # 4. the proxy_cost record's traffic: one client resending one image
    retry_x = np.repeat(images[:1], b, axis=0)
    retry_clients = ["peer:127.0.0.1:1"] * b
    both(retry_x, clients=retry_clients)  # its first query is recorded; every later one is a retry
    retry = interleaved({"whole magnet": (lambda a: magnet(a, clients=retry_clients), lambda: retry_x),
                         "whole magnet+knn": (lambda a: both(a, clients=retry_clients), lambda: retry_x)}, **kw)
    for name, r in retry.items():
        print(f"retry {name}: {r['cpu_us_per_item']:.1f} us CPU per item", flush=True)

    # 5. cProfile of the magnet+knn batch call, benign traffic
    batches = [stream.next() for _ in range(args.profile_calls)]
    prof = cProfile.Profile()
    prof.enable()
    for x, clients in batches:
        both(x, clients=clients)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    profile_text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())

    added = benign["whole magnet+knn"]["cpu_us_per_item"] - benign["whole magnet"]["cpu_us_per_item"]
    added_retry = retry["whole magnet+knn"]["cpu_us_per_item"] - retry["whole magnet"]["cpu_us_per_item"]
    result = {"command": "python bench/stateful/stage_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "niceness": os.nice(0),
              "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "load_average": os.getloadavg(),
              "machine": machine(), "bundle": str(bundle_path), "batch": b, "blocks": args.blocks,
              "calls": args.calls, "history": history, "fill_s": fill_s, "fused_embedding": fused_embedding,
              "knn_added_cpu_us_per_item": {"benign": added, "retry": added_retry},
              "benign": benign, "retry": retry, "profile_calls": args.profile_calls, "profile": profile_text}
    before = json.loads(Path(args.compare).read_text()) if args.compare else {}
    if before:
        result["compare"] = {"command": before["command"], "revision": before["machine"]["robustgate_revision"],
                             "knn_added_cpu_us_per_item": before["knn_added_cpu_us_per_item"]}
    out = Path(args.out)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result["machine"]
    nice = f"nice -n {result['niceness']} " if result["niceness"] else ""
    lines = [
        "# CPU per served item of the stateful k-NN stage in the proxy's batch call", "",
        f"Command: `{nice}{result['command']}` ({result['time_utc']}), {m['cpu']}, {m['cores']} cores (other jobs "
        f"share them when the load average is above 1: {tuple(round(v, 2) for v in result['load_average'])} at the end), revision "
        f"{m['robustgate_revision']}. Bundle `{bundle_path.name}`; runner built as `robustgate serve` builds it; "
        f"batches of {b} items; CPU = `time.process_time` (all threads), median over {args.blocks} blocks of "
        f"{args.calls} calls.", "",
        f"Store: {args.clients} clients, {args.history} earlier queries each (the bundle's test images) at the "
        f"start, {history['per_client_at_end']} at the end; benign batches take each item from a different "
        f"client, fresh images. k-NN embedding computed in the fused ONNX pass: {'yes' if fused_embedding else 'no'}.",
        "", f"**k-NN stage added per item** (whole magnet+knn - whole magnet): {added:.1f} µs CPU (benign), "
        f"{added_retry:.1f} µs (retry traffic, as bench/defenses/proxy_cost.py sends).", "",
        "| traffic | part | CPU µs per item (median) | wall µs per item |" + (" before: CPU µs per item |" if before else ""),
        "| --- | --- | ---: | ---: |" + (" ---: |" if before else "")]
    for traffic, rows in (("benign", benign), ("retry", retry)):
        for name, r in rows.items():
            was = before.get(traffic, {}).get(name) or before.get(traffic, {}).get(EARLIER_NAMES.get(name, ""))
            lines.append(f"| {traffic} | {name} | {r['cpu_us_per_item']:.1f} | {r['wall_us_per_item']:.1f} |"
                         + ((f" {was['cpu_us_per_item']:.1f} |" if was else " - |") if before else ""))
    if before:
        wm = before["machine"]
        lines += ["", f"`before`: the run `{before['command']}` ({before.get('time_utc', before.get('when'))}, revision "
                  f"{wm['robustgate_revision']}, load average at the end "
                  f"{tuple(round(v, 2) for v in before['load_average'])}): k-NN stage added "
                  f"{before['knn_added_cpu_us_per_item']['benign']:.1f} µs CPU per item (benign), "
                  f"{before['knn_added_cpu_us_per_item']['retry']:.1f} µs (retry): the JSON given to --compare."]
    lines += ["", "Notes: the parts are measured on their own, each on fresh batches (the store grows by what they "
              "record), so they do not add up exactly to the whole; `fused pass` is the one ONNX Runtime call of the "
              "runner (backbone + MagNet's score graph, and the k-NN encoder when it is fused). `retry`: one client "
              "resending one image (every query after the first an exact retry): the traffic of "
              "bench/defenses/proxy_cost.py, whose clients share one channel and one payload.", "",
              f"## cProfile of the magnet+knn batch call ({args.profile_calls} benign batches, by own time)", "",
              "```", profile_text, "```"]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:-3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
