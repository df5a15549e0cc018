"""The history stores' bounds, and two detectors sharing one real Redis server."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch

from redis_server import start_redis, stop_redis  # tests/helpers
from robustgate.defenses.stateful import Blacklight, MemoryStore, RedisStore

K = 4


def _h(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.uint64).reshape(len(rows), -1)


def _d(*values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def _stores(redis_url):
    yield MemoryStore(max_entries=64, max_per_client=3, max_clients=2, ttl_s=10.0, hashes_per_query=K)
    yield RedisStore(redis_url, max_entries=64, max_per_client=3, max_clients=2, ttl_s=10.0,
                     prefix=f"t{time.monotonic_ns()}")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port (tests/helpers/redis_server.py)."""
    url, proc = start_redis(tmp_path_factory.mktemp("redis"), "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    yield url
    stop_redis(proc)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_counts_retries_and_per_client_bound(backend, redis_url):
    store = dict(zip(["memory", "redis"], _stores(redis_url)))[backend]
    # query 1..3 share hashes 1,2 with the first; retry of query 1 scores 0
    got = store.observe("a", _d(11, 12, 11), _h([1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 4]), now=0.0)
    assert got.tolist() == [0, 2, 0]
    assert store.observe("a", _d(13), _h([0, 0, 5, 6]), now=1.0).tolist() == [2]  # zeros are no hash
    # max_per_client = 3: entries 12, 13 and the newest are kept, 11 is gone (no retry, no match)
    assert store.observe("a", _d(14), _h([7, 8, 9, 10]), now=2.0).tolist() == [0]
    assert store.observe("a", _d(11), _h([3, 4, 20, 21]), now=3.0).tolist() == [0]
    assert store.observe("a", _d(15), _h([3, 4, 22, 23]), now=4.0).tolist() == [2]  # matches the re-sent 11
    assert store.observe("b", _d(15), _h([3, 4, 22, 23]), now=4.0).tolist() == [0]  # clients are separate


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_ttl_forgets_old_queries(backend, redis_url):
    store = dict(zip(["memory", "redis"], _stores(redis_url)))[backend]
    store.observe("a", _d(1), _h([1, 2, 3, 4]), now=100.0)
    assert store.observe("a", _d(2), _h([1, 2, 3, 9]), now=109.0).tolist() == [3]
    assert store.observe("a", _d(3), _h([1, 2, 3, 8]), now=125.0).tolist() == [0]  # both older than 10 s
    assert store.observe("a", _d(1), _h([1, 2, 3, 4]), now=200.0).tolist() == [0]


def test_memory_store_global_and_client_bounds_and_stats():
    store = MemoryStore(max_entries=4, max_per_client=4, max_clients=2, ttl_s=1e6, hashes_per_query=K)
    store.observe("a", _d(1), _h([1, 2, 3, 4]), now=0.0)
    for i in range(4):  # four more entries push a's out of the global bound
        store.observe("b", _d(10 + i), _h([100 + i, 200 + i, 300 + i, 400 + i]), now=0.0)
    assert store.observe("a", _d(2), _h([1, 2, 3, 4]), now=0.0).tolist() == [0]
    store.observe("c", _d(3), _h([5, 6, 7, 8]), now=0.0)  # third client: b, the least recently active, is forgotten
    assert store.observe("b", _d(20), _h([100 + 3, 200 + 3, 9, 9]), now=0.0).tolist() == [0]
    stats = store.stats()
    assert stats["entries"] == 4 and stats["clients"] == 2
    assert stats["bytes"] >= 4 * 28  # arrays are preallocated


def test_two_detectors_share_one_client_stream_through_redis(redis_url):
    prefix = f"share{time.monotonic_ns()}"
    pod_a = Blacklight(store=RedisStore(redis_url, max_entries=1000, max_per_client=1000, prefix=prefix))
    pod_b = Blacklight(store=RedisStore(redis_url, max_entries=1000, max_per_client=1000, prefix=prefix))
    assert pod_a.store.fingerprint_key() == pod_b.store.fingerprint_key()  # set once, shared
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 28, 28, generator=g)
    assert pod_a.observe("attacker", x).tolist() == [0.0]
    step = x.clone()
    step[0, 0, 4:6, 4:6] = torch.rand(2, 2, generator=g)
    assert float(pod_b.observe("attacker", step)[0]) >= 15  # the other replica sees the first query
    assert pod_b.observe("attacker", x.clone()).tolist() == [0.0]  # a retry through another pod
    assert pod_a.observe("someone-else", step.clone()).tolist() == [0.0]
    stats = pod_a.store.stats()
    assert stats["clients"] == 2 and stats["entries"] == 3 and stats["bytes"] > 0
    # same scores as the in-memory store for the same stream and key
    mem = Blacklight(store=MemoryStore(max_entries=1000, max_per_client=1000, key=pod_a.store.fingerprint_key()))
    stream = torch.cat([x, step, x.clone(), step + 0.0])
    fresh = Blacklight(store=RedisStore(redis_url, max_entries=1000, max_per_client=1000, prefix=prefix))
    assert torch.equal(mem.observe("z", stream), fresh.observe("z", stream))
    fresh.store.clear()
    assert fresh.store.stats()["entries"] == 0


def test_memory_store_keeps_every_posting_when_keys_share_a_bucket():
    # the smallest index (2 buckets x 8 ways): 4 hashes + 1 digest always share buckets
    store = MemoryStore(max_entries=1, max_per_client=1, hashes_per_query=K)
    rng = np.random.default_rng(0)
    for _ in range(50):
        h = rng.integers(1, 2**63, (1, K), dtype=np.uint64)
        store.observe("a", rng.integers(1, 2**63, 1, dtype=np.uint64), h, now=0.0)
        assert store.observe("a", rng.integers(1, 2**63, 1, dtype=np.uint64), h, now=0.0).tolist() == [K]


def test_memory_store_serialises_concurrent_callers():
    from concurrent.futures import ThreadPoolExecutor

    store = MemoryStore(max_entries=10_000, max_per_client=10_000, hashes_per_query=K)
    rng = np.random.default_rng(1)
    h = rng.integers(1, 2**63, (1, K), dtype=np.uint64)

    def client(c: int) -> list[int]:
        return [int(store.observe(f"c{c}", np.array([i + 1], dtype=np.uint64), h, now=0.0)[0]) for i in range(200)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(client, range(4)))
    assert all(r == [0] + [K] * 199 for r in results)  # each client's stream intact
    assert store.stats()["entries"] == 800


def _near_copy_streams(rng, clients: int, n: int, pool: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Queries of ``clients`` clients in arrival order: each keeps most of its client's previous
    hashes (attack-like), with exact retries and hashes drawn from a small ``pool`` (collisions)."""
    out, last = [], {}
    for _ in range(n):
        c = f"c{int(rng.integers(clients))}"
        h = last.get(c, rng.integers(1, pool, K + 4, dtype=np.uint64)).copy()
        if rng.random() < 0.2 and c in last:
            d = np.uint64(int.from_bytes(hashlib.blake2b(h.tobytes(), digest_size=4).digest(), "little"))  # the same query again
        else:
            h[rng.integers(0, K + 4, 2)] = rng.integers(0, pool, 2, dtype=np.uint64)  # 0 = no hash
            d = np.uint64(rng.integers(1, 2**40))
        last[c] = h
        out.append((c, np.array([d], dtype=np.uint64), h[None].copy()))
    return out


@pytest.mark.parametrize("bounds, pool, clients, most", [
    (dict(max_entries=4096, max_per_client=4096, max_clients=8), 2**62, 5, 40),
    (dict(max_entries=64, max_per_client=9, max_clients=3), 2**62, 5, 40),
    (dict(max_entries=16, max_per_client=16, max_clients=8), 40, 5, 40),
    # many clients, small batches: mostly one query per client (the serving case, its shortcut)
    (dict(max_entries=4096, max_per_client=4096, max_clients=64), 2**62, 60, 8),
    (dict(max_entries=64, max_per_client=64, max_clients=64), 2**62, 60, 8)])
def test_batched_calls_leave_the_same_scores_and_state_as_one_query_at_a_time(bounds, pool, clients, most, monkeypatch):
    import robustgate.defenses.stateful.batch as batch_path

    fast = []
    real = batch_path.observe_vectorised
    monkeypatch.setattr(batch_path, "observe_vectorised", lambda *a: fast.append(real(*a)) or fast[-1])
    rng = np.random.default_rng(0)
    key = bytes(16)
    one = MemoryStore(**bounds, ttl_s=50.0, hashes_per_query=K + 4, key=key)
    many = MemoryStore(**bounds, ttl_s=50.0, hashes_per_query=K + 4, key=key)
    queries = _near_copy_streams(rng, clients, 1500, pool)
    i, now = 0, 0.0
    while i < len(queries):
        size = int(rng.integers(1, most))
        part, i = queries[i:i + size], i + size
        now += float(rng.integers(0, 3))
        groups: dict[str, list] = {}
        for c, d, h in part:  # a batch: each client's queries in order, clients by first appearance
            groups.setdefault(c, []).append((d, h))
        batch = [(c, np.concatenate([d for d, _ in v]), np.concatenate([h for _, h in v])) for c, v in groups.items()]
        want = [np.concatenate([one.observe(c, d[j:j + 1], h[j:j + 1], now) for j in range(len(d))]) for c, d, h in batch]
        got = many.observe_batch(batch, now)
        for w, g_ in zip(want, got):
            assert w.tolist() == g_.tolist()
        for name in ("_e_seq", "_e_client", "_e_cidx", "_e_time", "_e_digest", "_tags", "_p_seq"):
            assert np.array_equal(getattr(one, name), getattr(many, name)), name
        assert one._seq == many._seq and one._inserted == many._inserted
        assert list(one._clients.items()) == list(many._clients.items())
    assert sum(f is not None for f in fast) >= 4  # the vectorised path ran (it gives up on some batches)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_blocked_many_answers_each_client_as_blocked_until(backend, redis_url):
    """The pipeline asks a batch's clients' blocks in one call (one MGET on Redis): the same answers as
    ``blocked_until`` one by one, ended blocks included."""
    store = dict(zip(["memory", "redis"], _stores(redis_url)))[backend]
    now = time.time()
    store.block("a", now + 60)
    store.block("b", now + 0.2)
    clients = ["a", "b", "c", "a"]
    assert store.blocked_many(clients, now) == [store.blocked_until(c, now) for c in clients]
    first = store.blocked_many(clients, now)
    assert first[2] is None and first[0] == pytest.approx(now + 60)
    assert store.blocked_many(clients, now + 1) == [pytest.approx(now + 60), None, None, pytest.approx(now + 60)]
    assert store.blocked_many([], now) == []


@pytest.mark.parametrize("backend", ["memory", "redis", "knn", "knn-shared"])
def test_detections_in_a_window_of_the_clients_last_queries(backend, redis_url):
    """``add_detections(..., window)``: a client's detections among its last ``window`` recorded
    queries, on every store; without a window every detection counts until ``ttl_s`` after the last."""
    from robustgate.defenses.stateful.knn_store import KnnMemoryStore
    from robustgate.defenses.stateful.remote import RemoteStore, StoreService

    rng = np.random.default_rng(0)
    service = None
    if backend in ("memory", "redis"):
        store = dict(zip(["memory", "redis"], _stores(redis_url)))[backend]
        store.max_per_client = 1000  # bounds do not matter here; the query count does

        def send(client, n):  # n distinct queries, no retries
            for _ in range(n):
                store.observe(client, rng.integers(1, 2 ** 63, 1, dtype=np.uint64),
                              rng.integers(1, 2 ** 63, (1, K), dtype=np.uint64), time.time())
    else:
        if backend == "knn":
            store = KnnMemoryStore(max_entries=1000, max_per_client=500)
        else:
            service = StoreService()
            service.start()
            store = RemoteStore(service.path, {"stage": "w", "method": "knn", "origin": "knn", "top_k": 20,
                                               "spec": {"kind": "memory", "max_entries": 1000, "max_per_client": 500}})

        def send(client, n):
            for _ in range(n):
                store.observe(client, rng.integers(1, 2 ** 63, 1, dtype=np.uint64),
                              rng.standard_normal((1, 4)).astype(np.float32), 2, time.time())
    try:
        now = time.time()
        send("m", 1)
        assert store.add_detections("m", 1, now, 10) == 1
        send("m", 5)
        assert store.add_detections("m", 1, now, 10) == 2  # query 6: both within the last 10
        send("m", 10)
        assert store.add_detections("m", 1, now, 10) == 1  # query 16: the last 10 are 7-16, so 1 and 6 fell out
        assert store.add_detections("m", 3, now, 10) == 4  # several detections of one batch
        send("b", 20)  # without a window, as before: every detection until ttl_s after the last
        assert store.add_detections("b", 1, now) == 1
        send("b", 20)
        assert store.add_detections("b", 2, now) == 3
    finally:
        if service is not None:
            service.close()


def test_redis_batches_several_clients_in_one_call_as_the_memory_store_scores_them(redis_url, monkeypatch):
    """Blacklight's Redis store: a batch of several clients is one script call (``observe_batch``, and
    ``observe_unblocked`` with each client's block checked in it), scored as the memory store scores it."""
    mem = MemoryStore(max_entries=10_000, max_per_client=5, ttl_s=10.0, hashes_per_query=K)
    red = RedisStore(redis_url, max_entries=10_000, max_per_client=5, ttl_s=10.0, prefix=f"t{time.monotonic_ns()}")
    t0 = time.time()  # Redis expires a block on its own clock
    for store in (mem, red):
        store.block("x", t0 + 30.0)
    rng = np.random.default_rng(5)
    base = {c: rng.integers(1, 2 ** 63, K, dtype=np.uint64) for c in "abx"}
    red._redis.script_load(red._script.script)  # so that no call is a first EVALSHA retried after loading
    calls = []
    evalsha = red._redis.evalsha
    monkeypatch.setattr(red._redis, "evalsha", lambda *a: (calls.append(a[1]), evalsha(*a))[1])
    for step in range(20):
        groups = []
        for c in "abx":
            n = int(rng.integers(1, 3))
            hashes = np.where(rng.random((n, K)) < 0.8, base[c], rng.integers(1, 2 ** 63, (n, K), dtype=np.uint64))
            groups.append((c, rng.integers(1, 2 ** 63, n, dtype=np.uint64), hashes.astype(np.uint64)))
        now = t0 + 2 * step
        if step % 2:
            got, want = red.observe_unblocked(groups, now), mem.observe_unblocked(groups, now)
            assert got[0] == want[0] == [None, None, t0 + 30.0 if step < 15 else None]
            pairs = zip(got[1], want[1])
        else:
            pairs = zip(red.observe_batch(groups, now), mem.observe_batch(groups, now))
        for g, w in pairs:
            assert (g is None) == (w is None)
            if g is not None:
                np.testing.assert_array_equal(g, w)
    assert calls == [12] * 20  # one call per batch, 4 keys per client
