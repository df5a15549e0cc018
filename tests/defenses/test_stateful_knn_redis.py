"""The k-NN stage's history in a real Redis (defenses/stateful/knn_redis.py): the same distances as the
in-process store, whatever the calls (retries, the window, the per-client bound, the TTL); two
replicas' stores share a client's stream, a refitted encoder's namespace does not; a batch costs one
round trip, the block check included; ``store: {kind: redis}`` builds it for method knn."""

from __future__ import annotations

import time

import numpy as np
import pytest

from redis_server import start_redis, stop_redis  # tests/helpers
from robustgate.defenses.stateful.knn_redis import KnnRedisStore
from robustgate.defenses.stateful.knn_store import KnnMemoryStore


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    url, proc = start_redis(tmp_path_factory.mktemp("redis"), "--maxmemory", "64mb",
                            "--maxmemory-policy", "allkeys-lru")
    yield url
    stop_redis(proc)


def _prefix() -> str:
    return f"t{time.monotonic_ns()}"


@pytest.mark.parametrize("window", [None, 5])
def test_the_same_distances_as_the_in_process_store(redis_url, window):
    """200 batches of 1-3 clients with 1-3 queries each, 30% of them resending one of the client's
    earlier queries; per-client bound 7 and a TTL of 30 s that the last 50 batches (20 s apart) outlive."""
    rng = np.random.default_rng(0)
    mem = KnnMemoryStore(max_entries=100_000, max_per_client=7, ttl_s=30.0)
    red = KnnRedisStore(redis_url, max_entries=100_000, max_per_client=7, ttl_s=30.0, prefix=_prefix())
    sent: dict[str, list] = {}
    retries = 0
    for step in range(200):
        now = 1000.0 + step * (0.5 if step < 150 else 20.0)
        groups = []
        for c in rng.choice(["a", "b", "c", "d"], size=int(rng.integers(1, 4)), replace=False):
            n = int(rng.integers(1, 4))
            d, e = rng.integers(1, 2 ** 63, n, dtype=np.uint64), rng.standard_normal((n, 4)).astype(np.float32)
            for i in range(n):
                if sent.get(c) and rng.random() < 0.3:
                    d[i], e[i] = sent[c][int(rng.integers(len(sent[c])))]
            sent.setdefault(str(c), []).extend(zip(d.tolist(), e))
            groups.append((str(c), d, e))
        got, want = red.observe_batch(groups, 3, now, window), mem.observe_batch(groups, 3, now, window)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
            retries += int(np.isinf(w).all(axis=1).sum())
    assert retries > 50  # the retries (and first queries) were there to be recognised
    for c in sent:  # a digest leaves the client's hash with its record: the hash is bounded too
        assert 0 < red._redis.hlen(red._keys(c)[0]) <= 7


def test_two_replicas_share_a_stream_and_a_new_encoder_starts_empty(redis_url):
    prefix, rng = _prefix(), np.random.default_rng(1)
    pod_a, pod_b = (KnnRedisStore(redis_url, prefix=prefix, namespace="enc1") for _ in range(2))
    refit = KnnRedisStore(redis_url, prefix=prefix, namespace="enc2")
    assert pod_a.fingerprint_key() == pod_b.fingerprint_key() != refit.fingerprint_key()
    center = rng.standard_normal(8).astype(np.float32)
    for i, pod in enumerate((pod_a, pod_b, pod_a)):
        pod.observe("m", np.array([i + 1], np.uint64), center[None] + 1e-3 * i, 2, 100.0 + i)
    (dist,) = pod_b.observe("m", np.array([9], np.uint64), center[None], 2, 104.0)
    assert np.all(dist < 0.01)  # the three earlier near-copies, two recorded through the other pod
    assert np.isinf(refit.observe("m", np.array([9], np.uint64), center[None], 2, 104.0)).all()
    assert pod_a.stats()["entries"] == 4 and pod_a.stats()["clients"] == 1
    with pytest.raises(ValueError, match="dimensions"):
        pod_a.observe("m", np.array([10], np.uint64), np.zeros((1, 9), np.float32), 2, 105.0)


def test_a_batch_is_one_round_trip_the_block_check_included(redis_url, monkeypatch):
    """``observe_unblocked``: one script call for the batch (no MGET of the blocks first); the blocked
    client's queries are neither scored nor recorded."""
    store = KnnRedisStore(redis_url, max_per_client=100, prefix=_prefix())
    store.block("x", time.time() + 60)
    store._redis.script_load(store._script.script)  # so that no call is a first EVALSHA retried after loading
    calls = []
    evalsha = store._redis.evalsha
    rng = np.random.default_rng(2)
    groups = [(c, rng.integers(1, 2 ** 63, 2, dtype=np.uint64), rng.standard_normal((2, 4)).astype(np.float32))
              for c in ("a", "x", "b")]
    with monkeypatch.context() as m:
        m.setattr(store._redis, "evalsha", lambda *a: (calls.append(a[1]), evalsha(*a))[1])
        m.setattr(store._redis, "mget", lambda *a, **k: pytest.fail("a separate block check"))
        m.setattr(store._redis, "pipeline", lambda *a, **k: pytest.fail("a command per client"))
        ends, dists = store.observe_unblocked(groups, time.time(), k=2, window=None)
    assert calls == [12]  # one call, the three clients' 4 keys each
    assert ends[0] is None and ends[2] is None and ends[1] == pytest.approx(time.time() + 60, abs=5)
    assert dists[1] is None and dists[0].shape == dists[2].shape == (2, 2)
    assert store.stats()["entries"] == 4  # a's and b's, not x's
    with pytest.raises(TypeError, match="needs k"):
        store.observe_unblocked(groups, time.time())


def test_store_kind_redis_builds_the_knn_redis_store_namespaced_by_the_encoder(redis_url):
    from robustgate.defenses.stateful.store import store_for

    a = store_for("knn", {"kind": "redis", "url": redis_url, "max_per_client": 50}, origin="knn:aaaa")
    b = store_for("knn", {"kind": "redis", "url": redis_url, "max_per_client": 50}, origin="knn:bbbb")
    assert isinstance(a, KnnRedisStore) and a.holds == "embeddings" and a.max_per_client == 50
    assert a.prefix != b.prefix and a.prefix.startswith("rg:knn:")
    with pytest.raises(ValueError, match=r"store.kind must be one of \['memory', 'redis'\]"):
        store_for("knn", {"kind": "etcd"})
    with pytest.raises(ValueError, match=r"store \(redis, method knn\): .*hashes_per_query"):
        store_for("knn", {"kind": "redis", "url": redis_url, "hashes_per_query": 20})
