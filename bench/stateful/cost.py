"""Cost of the stateful detector (issue 22 targets: memory <= 256 MiB for 1,000,000 remembered
queries, p99 lookup <= 1 ms): the in-memory store filled with 1,000,000 queries (its array bytes
and the process's resident-memory growth), the latency of one store call (lookup + insert of one
query) on the full store and through a real redis-server on loopback, and the throughput of
``Blacklight.observe`` (fingerprint + store; wall and this thread's CPU time) at batch 1, 16 and 64 on [1, 28, 28] Fashion-MNIST test
images and [3, 32, 32] uniform noise.

    python bench/stateful/cost.py [--entries 1000000] [--out bench/results/stateful.cost]

``--method knn``: the same for the k-NN method (defenses/stateful/knn.py): the embedding store
(knn_store.py) filled with 1,000,000 synthetic float32 embeddings, one store call (k-NN over the
client's history + insert) on the full store, and ``observe`` (keyed digest + ONNX Runtime encoder
+ store) at batch 1, 16 and 64; the encoder is a freshly initialised one of the configured width
and dim per input shape (its cost does not depend on its weights). The same fill and store call
through a real redis-server on loopback (defenses/stateful/knn_redis.py; its memory is the
server's ``used_memory`` growth).

    python bench/stateful/cost.py --method knn [--out bench/results/stateful.cost.knn]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "hardening"))
from common import machine, rss_mib, test_images  # noqa: E402

from robustgate.defenses.stateful import Blacklight, MemoryStore, RedisStore  # noqa: E402

K = 20


def throughput_rows(throughput: dict) -> list[str]:
    """The observe-throughput table's rows (both methods' reports): ``{"<shape>_b<batch>": cell}``."""
    rows = []
    for key, tp in throughput.items():
        shape, batch = key.rsplit("_b", 1)
        rows.append(f"| {shape} | {batch} | {tp['images_per_s']:,.0f} | {tp['us_per_image']:.0f} | "
                    f"{tp['cpu_us_per_image']:.0f} |")
    return rows


def synthetic_stream(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` queries of one client: digests ``[n]`` and fingerprints ``[n, K]`` where each query keeps
    18 of the previous query's hashes (an attack's near-copies) -- the postings a real stream writes."""
    hashes = np.empty((n, K), dtype=np.uint64)
    hashes[0] = rng.integers(1, 2**63, K, dtype=np.uint64)
    for i in range(1, n):
        hashes[i] = hashes[i - 1]
        hashes[i, rng.integers(0, K, 2)] = rng.integers(1, 2**63, 2, dtype=np.uint64)
    return rng.integers(1, 2**63, n, dtype=np.uint64), hashes


def fill(store, entries: int, clients: int, rng) -> None:
    for c in tqdm(range(clients), desc="fill 1 query at a time", unit="client"):
        per = entries // clients + (c < entries % clients)
        d, h = synthetic_stream(rng, per)
        for i in range(per):
            store.observe(f"client-{c}", d[i:i + 1], h[i:i + 1], now=1000.0)


def call_latency(store, n: int, rng, now: float | None) -> dict[str, float]:
    """Latency of ``n`` single-query store calls (lookup + insert) of 50 clients, in microseconds."""
    times, cpu = np.empty(n), np.empty(n)
    streams = [synthetic_stream(rng, n // 50 + 1) for _ in range(50)]
    for i in tqdm(range(n), desc="store latency", unit="q"):
        d, h = streams[i % 50]
        j = i // 50
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        store.observe(f"lat-{i % 50}", d[j:j + 1], h[j:j + 1], now=now)
        times[i], cpu[i] = time.perf_counter_ns() - t, time.thread_time_ns() - c
    times /= 1e3
    cpu /= 1e3
    return {"p50_us": float(np.percentile(times, 50)), "p99_us": float(np.percentile(times, 99)),
            "max_us": float(times.max()), "cpu_p50_us": float(np.percentile(cpu, 50)),
            "cpu_p99_us": float(np.percentile(cpu, 99)), "n": n}


def observe_throughput(det: Blacklight, x: torch.Tensor, batch: int, seconds: float) -> dict[str, float]:
    """Images per second of ``det.observe`` on batches of ``x``, one client per 256 images."""
    done, start, cpu0, i = 0, time.perf_counter(), time.thread_time(), 0
    while time.perf_counter() - start < seconds:
        xb = x[(i * batch) % len(x):][:batch]
        det.observe(f"tp-{done // 256}", xb)
        done += len(xb)
        i += 1
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    return {"images_per_s": done / elapsed, "us_per_image": 1e6 * elapsed / done, "cpu_us_per_image": 1e6 * cpu / done,
            "images": done}


def start_redis() -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="rg-redis-"))
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0", workdir
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def knn_stream(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` queries of one client: digests ``[n]`` and float32 embeddings ``[n, dim]``, each a small
    step from the previous one (an attack's near-copies)."""
    steps = rng.normal(scale=0.05, size=(n, dim)).astype(np.float32)
    steps[0] = rng.normal(size=dim)
    return rng.integers(1, 2**63, n, dtype=np.uint64), np.cumsum(steps, axis=0)


def knn_latency(store, args, rng, desc: str, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Wall and CPU µs of ``args.latency_queries`` single-query store calls, spread over the clients."""
    times, cpu = np.empty(args.latency_queries), np.empty(args.latency_queries)
    for i in tqdm(range(args.latency_queries), desc=desc, unit="q"):
        d, e = knn_stream(rng, 1, args.dim)
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        store.observe(f"client-{i % args.clients}", d, e, args.k, now=1000.0, window=window)
        times[i], cpu[i] = time.perf_counter_ns() - t, time.thread_time_ns() - c
    return times / 1e3, cpu / 1e3


def knn_redis_cost(args, rng, per_client: int, row) -> tuple[dict, dict]:
    """The k-NN store in a real redis-server: filled as the memory store is (50 queries per call), its
    ``used_memory`` growth, then the latency of single-query calls on the full store."""
    from robustgate.defenses.stateful.knn_redis import KnnRedisStore

    proc, url, workdir = start_redis()
    try:
        store = KnnRedisStore(url, max_per_client=per_client, ttl_s=1e9)
        used0 = int(store._redis.info("memory")["used_memory"])
        t0 = time.perf_counter()
        for c in tqdm(range(args.clients), desc="redis: fill 50 queries per call", unit="client"):
            per = args.entries // args.clients + (c < args.entries % args.clients)
            d, e = knn_stream(rng, per, args.dim)
            for i in range(0, per, 50):
                store.observe(f"client-{c}", d[i:i + 50], e[i:i + 50], args.k, now=1000.0, window=256)
        fill_s = time.perf_counter() - t0
        used = int(store._redis.info("memory")["used_memory"]) - used0
        memory = {"entries": store.stats()["entries"], "used_memory_mib": used / 2**20, "fill_s": fill_s,
                  "fill_queries_per_s": args.entries / fill_s}
        times, cpu = knn_latency(store, args, rng, "redis: store latency", window=256)
        return memory, row(times, cpu, min(per_client, args.entries // args.clients))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def knn_main(args) -> None:
    """``--method knn`` (module docstring)."""
    import os
    import tempfile as tf

    from robustgate.defenses.stateful.knn import Encoder, KnnDetector
    from robustgate.defenses.stateful.knn_store import KnnMemoryStore

    rng = np.random.default_rng(0)
    dim, k = args.dim, args.k
    per_client = min(10_000, args.entries)
    rss0 = rss_mib(os.getpid())
    store = KnnMemoryStore(max_entries=args.entries, max_per_client=per_client, max_clients=100_000, ttl_s=1e9)
    d_old, e_old = knn_stream(rng, 1, dim)
    store.observe("old", d_old, e_old, k, now=1000.0)
    t0 = time.perf_counter()
    left = args.entries - 1
    for c in tqdm(range(args.clients), desc="fill 50 queries per call", unit="client"):
        per = left // args.clients + (c < left % args.clients)
        d, e = knn_stream(rng, per, dim)
        for i in range(0, per, 50):
            store.observe(f"client-{c}", d[i:i + 50], e[i:i + 50], k, now=1000.0)
    fill_s = time.perf_counter() - t0
    rss1 = rss_mib(os.getpid())
    retained = bool(np.isfinite(store.observe("old", d_old + np.uint64(1), e_old, 1, now=1000.0)).all())
    stats = store.stats()
    memory = {"entries": stats["entries"], "clients": stats["clients"], "store_bytes": stats["bytes"],
              "store_mib": stats["bytes"] / 2**20, "rss_growth_mib": rss1 - rss0, "fill_s": fill_s,
              "fill_queries_per_s": (args.entries - 1) / fill_s, "oldest_query_still_held": retained}
    times, cpu = knn_latency(store, args, rng, "store latency")

    def row(times, cpu, history):
        return {"p50_us": float(np.percentile(times, 50)), "p99_us": float(np.percentile(times, 99)),
                "max_us": float(times.max()), "cpu_p50_us": float(np.percentile(cpu, 50)),
                "cpu_p99_us": float(np.percentile(cpu, 99)), "n": len(times), "history_per_client": history}

    latency = {"memory_full": row(times, cpu, min(per_client, args.entries // args.clients))}
    # one client at its max_per_client bound (an attacker that sent that many queries within the TTL)
    d, e = knn_stream(rng, per_client + 2000, dim)
    big = np.empty(2000), np.empty(2000)
    store.observe("at-bound", d[:per_client], e[:per_client], k, now=1000.0)
    for i in tqdm(range(2000), desc="store latency at the bound", unit="q"):
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        store.observe("at-bound", d[per_client + i:per_client + i + 1], e[per_client + i:per_client + i + 1], k, now=1000.0)
        big[0][i], big[1][i] = time.perf_counter_ns() - t, time.thread_time_ns() - c
    latency["client_at_bound"] = row(big[0] / 1e3, big[1] / 1e3, per_client)
    redis_memory, latency["redis_full"] = knn_redis_cost(args, rng, per_client, row)
    fm, _ = test_images(2048)
    inputs = {"1x28x28": torch.from_numpy(fm), "3x32x32": torch.rand(2048, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    throughput = {}
    with tf.TemporaryDirectory() as tmp:
        for name, x in inputs.items():
            enc = Encoder(x.shape[1], args.width, dim)
            det = KnnDetector(k=k, dim=dim, width=args.width, store=KnnMemoryStore(max_entries=args.entries,
                                                                                    max_per_client=per_client))
            det.encoder, det._item_shape = enc, tuple(x.shape[1:])
            det.save(Path(tmp) / name)
            for batch in (1, 16, 64):
                throughput[f"{name}_b{batch}"] = observe_throughput(det, x, batch, args.seconds)
                print(name, batch, throughput[f"{name}_b{batch}"], flush=True)
    config = det.config()
    result = {"command": "python bench/stateful/cost.py " + " ".join(sys.argv[1:]), "load_average": os.getloadavg(),
              "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(),
              "detector": config, "store": store.config(), "memory": memory, "redis_memory": redis_memory,
              "latency": latency,
              "throughput": throughput}
    out = Path(args.out)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result["machine"]
    lines = [
        "# Stateful detector cost (k-NN over a learned embedding, in-memory store)", "",
        f"Command: `{result['command']}` ({result['when']}), {m['cpu']}, {m['cores']} cores, load average at the end {tuple(round(v, 2) for v in result['load_average'])}, "
        f"torch 1 thread, ONNX Runtime 1 intra-op thread, revision {m['robustgate_revision']}.", "",
        f"Detector: k {k}, dim {dim}, width {args.width}; store: {store.config()}.", "",
        "## Memory for remembered queries", "",
        f"| entries | store arrays | process RSS growth | fill rate | its oldest query still held |",
        "| ---: | ---: | ---: | ---: | --- |",
        f"| {memory['entries']:,} | {memory['store_mib']:.1f} MiB | {memory['rss_growth_mib']:.1f} MiB | "
        f"{memory['fill_queries_per_s']:,.0f} queries/s | {memory['oldest_query_still_held']} |", "",
        f"In a redis-server on loopback (defenses/stateful/knn_redis.py: records of 16 + 4 x {dim} bytes in a ring "
        f"string per client, a hash of their digests): {redis_memory['entries']:,} entries, "
        f"{redis_memory['used_memory_mib']:.1f} MiB of the server's `used_memory`, filled at "
        f"{redis_memory['fill_queries_per_s']:,.0f} queries/s (50 per call).", "",
        "## One store call (k-NN over the client's history + insert of one query)", "",
        "| store | client history | wall p50 | wall p99 | wall max | CPU p50 | CPU p99 | calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {name} | {lat['history_per_client']:,} | {lat['p50_us']:.0f} µs | {lat['p99_us']:.0f} µs | "
          f"{lat['max_us']:.0f} µs | {lat['cpu_p50_us']:.0f} µs | {lat['cpu_p99_us']:.0f} µs | {lat['n']:,} |"
          for name, lat in latency.items()], "",
        "## `observe` throughput (digest + ONNX Runtime encoder + the store)", "",
        "| input | batch | images/s | wall µs per image | CPU µs per image |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += throughput_rows(throughput)
    lines += ["", "Notes: wall times include the scheduling noise of a 2-core machine (load average in the header); the "
              "CPU columns (this thread's CPU time) do not. Memory and latency rows use synthetic embeddings "
              "(random walks, one per client); `redis_full`: a single-query call through the Redis store with the "
              "window of 256 (the stage's default: the script returns the client's last 256 records, the "
              "distances are computed here), wall time including the loopback round trip; the memory store's rows "
              "compare with the client's whole history; the throughput rows encode real pixels "
              "(Fashion-MNIST test images; "
              "uniform noise at 3x32x32) with a freshly initialised encoder of the same architecture as a fitted "
              "one, one client per 256 images. A store call's cost grows with the client's history (k-NN by "
              "brute force over it, O(history x dim))."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("blacklight", "knn"), default="blacklight")
    ap.add_argument("--k", type=int, default=4, help="knn: neighbours")
    ap.add_argument("--dim", type=int, default=32, help="knn: embedding dimensions")
    from robustgate.defenses.stateful.knn import KnnDetector

    width = inspect.signature(KnnDetector).parameters["width"].default
    ap.add_argument("--width", type=int, default=width, help=f"knn: encoder width (KnnDetector's default, {width})")
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--latency-queries", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput cell")
    ap.add_argument("--out", default=None, help="output stem (default: bench/results/stateful.cost, "
                                                 "stateful.cost.knn with --method knn)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / ("stateful.cost.knn" if args.method == "knn" else "stateful.cost"))
    if args.method == "knn":
        return knn_main(args)
    rng = np.random.default_rng(0)
    import os

    rss0 = rss_mib(os.getpid())
    store = MemoryStore(max_entries=args.entries, max_per_client=min(10_000, args.entries), max_clients=100_000, ttl_s=1e9,
                        hashes_per_query=K)
    # a client's first query, then the store filled to max_entries: is the oldest entry still matched?
    d_old, h_old = synthetic_stream(rng, 1)
    store.observe("old", d_old, h_old, now=1000.0)
    t0 = time.perf_counter()
    fill(store, args.entries - 1, args.clients, rng)
    fill_s = time.perf_counter() - t0
    rss1 = rss_mib(os.getpid())
    retained = int(store.observe("old", d_old + np.uint64(1), h_old, now=1000.0)[0])
    stats = store.stats()
    memory = {"entries": stats["entries"], "clients": stats["clients"], "store_bytes": stats["bytes"],
              "store_mib": stats["bytes"] / 2**20, "rss_growth_mib": rss1 - rss0,
              "fill_s": fill_s, "fill_queries_per_s": (args.entries - 1) / fill_s,
              "oldest_query_match_count": retained, "oldest_query_still_matched": retained == K}
    latency = {"memory_full": call_latency(store, args.latency_queries, rng, now=1000.0)}

    proc, url, workdir = start_redis()
    try:
        rstore = RedisStore(url, max_entries=args.entries, max_per_client=min(10_000, args.entries), ttl_s=3600.0, prefix="bench")
        latency["redis_loopback"] = call_latency(rstore, min(args.latency_queries, 5000), rng, now=None)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    fm, _ = test_images(2048)
    inputs = {"1x28x28": torch.from_numpy(fm), "3x32x32": torch.rand(2048, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    det = Blacklight(store=store)
    throughput = {}
    for name, x in inputs.items():
        for batch in (1, 16, 64):
            throughput[f"{name}_b{batch}"] = observe_throughput(det, x, batch, args.seconds)
            print(name, batch, throughput[f"{name}_b{batch}"], flush=True)

    result = {"command": "python bench/stateful/cost.py " + " ".join(sys.argv[1:]), "load_average": os.getloadavg(),
              "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(),
              "detector": det.config(), "store": store.config(), "memory": memory, "latency": latency,
              "throughput": throughput}
    out = Path(args.out)  # a stem: OUT.json and OUT.md (with_suffix would eat ".cost")
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Stateful detector cost (Blacklight, in-memory and Redis stores)", "",
        f"Command: `{result['command']}` ({result['when']}), {m['cpu']}, {m['cores']} cores, load average at the end {tuple(round(v, 2) for v in result['load_average'])}, "
        f"torch 1 thread, revision {m['robustgate_revision']}.", "",
        f"Detector: {det.config()}; store: {store.config()}.", "",
        "## Memory for remembered queries", "",
        "| entries | store arrays | process RSS growth | fill rate | its oldest query still matched (20 of 20 hashes) |",
        "| ---: | ---: | ---: | ---: | --- |",
        f"| {memory['entries']:,} | {memory['store_mib']:.1f} MiB | {memory['rss_growth_mib']:.1f} MiB | "
        f"{memory['fill_queries_per_s']:,.0f} queries/s | {memory['oldest_query_still_matched']} |", "",
        "## One store call (lookup + insert of one query)", "",
        "| store | wall p50 | wall p99 | wall max | CPU p50 | CPU p99 | calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, lat in latency.items():
        lines.append(f"| {name} | {lat['p50_us']:.0f} µs | {lat['p99_us']:.0f} µs | {lat['max_us']:.0f} µs | "
                     f"{lat['cpu_p50_us']:.0f} µs | {lat['cpu_p99_us']:.0f} µs | {lat['n']:,} |")
    lines += ["", "## `Blacklight.observe` throughput (fingerprint + the in-memory store above, full)", "",
              "| input | batch | images/s | wall µs per image | CPU µs per image |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += throughput_rows(throughput)
    lines += ["", "Notes: store latency is wall time per call on a 2-core machine (load average in the header), so "
              "wall p99/max include scheduling noise; the CPU columns (this thread's CPU time) do not; for Redis "
              "they are the client's side only. The Redis row is one Lua script call over loopback TCP. "
              "Fingerprints in the memory and latency rows are synthetic (each query keeps 18 of its predecessor's "
              "20 hashes); the throughput rows hash real pixels, one client per 256 images (its batch goes through the vectorised batch path, defenses/stateful/batch.py); their CPU column is this thread's CPU time per image, the figure to read on a shared machine."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
