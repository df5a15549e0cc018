"""The replica's shared store service (defenses/stateful/remote.py): a :class:`RemoteStore` gives the
same scores, blocks and counts as the in-process store it stands for, several clients of one
namespace share one history, and bad frames, replaced stores and a missing service are clear errors."""

from __future__ import annotations

import multiprocessing
import socket
import time

import numpy as np
import pytest
import torch

from robustgate.defenses.pipeline import Stage, observe_clients
from robustgate.defenses.stateful.knn_store import KnnMemoryStore
from robustgate.defenses.stateful.remote import RemoteStore, StoreError, StoreService, pack, read_frame, unpack
from robustgate.defenses.stateful.stage import Stateful
from robustgate.defenses.stateful.store import MemoryStore

SPEC = {"kind": "memory", "max_entries": 1000, "max_per_client": 200}


def namespace(method: str = "knn", stage: str = "s", origin: str = "knn:aa") -> dict:
    return {"stage": stage, "method": method, "origin": origin, "spec": SPEC, "top_k": 6}


@pytest.fixture
def service():
    svc = StoreService()  # its own 0700 directory (a Unix socket's path must stay short)
    svc.start()
    yield svc
    svc.close()


def test_frames_round_trip_and_refuse_what_does_not_add_up():
    arrays = [np.arange(5, dtype=np.uint64), np.ones((2, 3), np.float32), np.array([-1], np.int64)]
    frame = pack({"op": "x", "n": [1, None]}, arrays)
    hlen, blen = int.from_bytes(frame[:4], "little"), int.from_bytes(frame[4:8], "little")
    header, got = unpack(frame[8:8 + hlen], bytearray(frame[8 + hlen:]))
    assert header == {"op": "x", "n": [1, None]} and blen == sum(a.nbytes for a in arrays)
    for a, b in zip(arrays, got):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype and b.flags.writeable
    with pytest.raises(ValueError, match="shorter"):
        unpack(frame[8:8 + hlen], frame[8 + hlen:-1])
    with pytest.raises(ValueError, match="longer"):
        unpack(frame[8:8 + hlen], frame[8 + hlen:] + b"\0")
    with pytest.raises(ValueError, match="bad array"):
        unpack(b'{"arrays": [["O", [1]]]}', b"")
    with pytest.raises(ValueError, match="cannot send"):
        pack({}, [np.array(["a"], dtype=object)])


def _groups(rng, clients, rows, dim=8, near=None):
    out = []
    for c in clients:
        emb = rng.standard_normal((rows, dim), dtype=np.float32) if near is None else near + 1e-3 * rng.standard_normal(
            (rows, dim), dtype=np.float32)
        out.append((c, rng.integers(1, 2 ** 63, rows, dtype=np.uint64), emb))
    return out


def test_knn_scores_state_and_flags_equal_the_in_process_store(service):
    """Two workers' RemoteStores of one namespace against one KnnMemoryStore fed the same calls."""
    rng = np.random.default_rng(0)
    a, b = RemoteStore(service.path, namespace()), RemoteStore(service.path, namespace())
    assert a.id == b.id and a.fingerprint_key() == b.fingerprint_key() and len(a.fingerprint_key()) == 16
    assert (a.max_entries, a.max_per_client, a.ttl_s) == (1000, 200, 3600.0)
    local = KnnMemoryStore(max_entries=1000, max_per_client=200)
    for step in range(40):
        groups = _groups(rng, [f"c{(step + i) % 5}" for i in range(3)], rows=1 + step % 3)
        if step % 7 == 3:  # an exact retry of a remembered query
            c, d, e = groups[0]
            groups[0] = (c, d.copy(), e)
            local.observe(c, d, e, 4, 1000.0 + step)
            (a if step % 2 else b).observe(c, d, e, 4, now=1000.0 + step)
        got = (a if step % 2 else b).observe_batch(groups, 4, 1000.0 + step)
        want = local.observe_batch(groups, 4, 1000.0 + step)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert a.stats() == local.stats()
    assert a.blocked_many(["c0", "c1"], 2000.0) == [None, None]
    assert a.add_detections("c0", 2, 2000.0) == 2 and b.add_detections("c0", 1, 2001.0) == 3
    b.block("c0", 2100.0)
    assert a.blocked_until("c0", 2050.0) == 2100.0 and a.blocked_many(["c1", "c0"], 2050.0) == [None, 2100.0]
    assert a.blocked_until("c0", 2100.0) is None  # ended
    a.clear()
    assert b.stats()["entries"] == 0


def test_blacklight_through_the_service_equals_the_memory_store(service):
    rng = np.random.default_rng(1)
    remote = RemoteStore(service.path, namespace("blacklight", origin="blacklight"))
    local = MemoryStore(max_entries=1000, max_per_client=200, hashes_per_query=6)
    base = rng.integers(1, 2 ** 63, 6, dtype=np.uint64)
    for step in range(20):
        hashes = np.where(rng.random((2, 6)) < 0.7, base, rng.integers(1, 2 ** 63, (2, 6), dtype=np.uint64))
        groups = [("m", rng.integers(1, 2 ** 63, 2, dtype=np.uint64), hashes.astype(np.uint64))]
        np.testing.assert_array_equal(remote.observe_batch(groups, 100.0 + step)[0],
                                      local.observe_batch(groups, 100.0 + step)[0])
    assert remote.stats() == local.stats()


def test_a_detector_uses_the_shared_store_and_two_workers_share_one_history(service):
    """The k-NN stage accepts a RemoteStore; near-copies sent through two clients (two workers) are
    scored against one history."""
    rng = np.random.default_rng(2)
    det = Stateful(method="knn", k=2, dim=8, store=RemoteStore(service.path, namespace()))
    other = RemoteStore(service.path, namespace())
    center = rng.standard_normal(8).astype(np.float32)
    first = _groups(rng, ["mallory"], rows=2, near=center)
    det.store.observe_batch(first, 2, 10.0)
    (dist,) = other.observe_batch(_groups(rng, ["mallory"], rows=1, near=center), 2, 11.0)
    assert np.all(dist < 0.05)  # the two earlier near-copies, remembered by the other worker's call
    with pytest.raises(ValueError, match="embeddings"):
        Stateful(method="knn", store=RemoteStore(service.path, namespace("blacklight", stage="b", origin="blacklight")))


def test_observe_unblocked_through_the_service_equals_the_in_process_store(service):
    """The block check and the observation in one call: a blocked client's groups are neither scored
    nor recorded, the others as ``observe_batch`` scores them; k-NN and Blacklight."""
    rng = np.random.default_rng(3)
    knn, local = RemoteStore(service.path, namespace()), KnnMemoryStore(max_entries=1000, max_per_client=200)
    bl = RemoteStore(service.path, namespace("blacklight", stage="b", origin="blacklight"))
    bl_local = MemoryStore(max_entries=1000, max_per_client=200, hashes_per_query=6)
    for store in (knn, local, bl, bl_local):
        store.block("c1", 1050.0)
    for step in range(12):
        groups = _groups(rng, ["c0", "c1", "c2"], rows=1 + step % 2)
        got, want = knn.observe_unblocked(groups, 1000.0 + 10 * step, k=3), local.observe_unblocked(
            groups, 1000.0 + 10 * step, k=3)
        assert got[0] == want[0] == ([None, 1050.0, None] if step < 5 else [None] * 3)
        for g, w in zip(got[1], want[1]):
            assert (g is None) == (w is None)
            if g is not None:
                np.testing.assert_array_equal(g, w)
        hashes = [(c, d, rng.integers(1, 50, (len(d), 6), dtype=np.uint64)) for c, d, _ in groups]
        got, want = bl.observe_unblocked(hashes, 1000.0 + 10 * step), bl_local.observe_unblocked(
            hashes, 1000.0 + 10 * step)
        assert got[0] == want[0] and [g is None for g in got[1]] == [w is None for w in want[1]]
        for g, w in zip(got[1], want[1]):
            if g is not None:
                np.testing.assert_array_equal(g, w)
    assert knn.stats() == local.stats() and bl.stats() == bl_local.stats()
    assert knn.observe_unblocked([], 2000.0, k=3) == ([], [])
    with pytest.raises(TypeError, match="needs k"):
        knn.observe_unblocked(groups, 2000.0)


def test_a_pipeline_batch_costs_one_round_trip_to_the_shared_store(service, monkeypatch):
    """``observe_clients`` on a store shared by the workers: one call of the service per batch (the
    block check rides on the observation), the blocked client's item scored 0, answered with its block
    end and not recorded; the same scores and block ends as the in-process store's."""
    ops = []
    call = service.call
    monkeypatch.setattr(service, "call", lambda header, arrays: (ops.append(header["op"]), call(header, arrays))[1])
    rng = np.random.default_rng(4)
    remote = Stage("s", Stateful(method="knn", k=2, dim=8, threshold=0.5, store=RemoteStore(service.path, namespace())),
                   "block", cooldown_s=60.0)
    local = Stage("s", Stateful(method="knn", k=2, dim=8, threshold=0.5, store=KnnMemoryStore()), "block",
                  cooldown_s=60.0)
    until = time.time() + 100.0
    for stage in (remote, local):
        stage.defense.store.block("b", until)
    for _ in range(3):
        x = torch.rand(4, 1, 4, 4)
        emb = 10 * rng.standard_normal((4, 8), dtype=np.float32)  # far apart: nothing detected
        ops.clear()
        got = observe_clients(remote, x, ["a", "b", "a", "c"], emb, checked=True)
        assert ops == ["observe_unblocked"]
        want = observe_clients(local, x, ["a", "b", "a", "c"], emb, checked=True)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1] == [None, until, None, None] and float(got[0][1]) == 0.0
    assert remote.defense.store.stats()["entries"] == local.defense.store.stats()["entries"] == 9


def test_a_new_namespace_replaces_the_stage_store_and_the_old_id_is_refused(service):
    old = RemoteStore(service.path, namespace(origin="knn:aa"))
    new = RemoteStore(service.path, namespace(origin="knn:bb"))  # a refitted encoder
    assert new.id != old.id
    with pytest.raises(StoreError, match="replaced"):
        old.stats()
    assert new.stats()["entries"] == 0
    other_stage = RemoteStore(service.path, namespace(stage="t"))
    assert new.stats() == other_stage.stats()  # a second stage leaves the first alone


def test_bad_calls_are_errors_and_the_service_keeps_serving(service):
    store = RemoteStore(service.path, namespace())
    store.observe_batch([("c", np.ones(1, np.uint64), np.ones((1, 8), np.float32))], 4, 1.0)
    with pytest.raises(StoreError, match="dimensions"):
        store.observe_batch([("c", np.ones(1, np.uint64) * 2, np.ones((1, 9), np.float32))], 4, 1.0)
    with pytest.raises(StoreError, match="unknown operation"):
        store._call({"op": "drop_all", "store": store.id})
    with pytest.raises(TypeError, match="observe_batch takes"):
        store.observe_batch([], 4, 1.0, 2, 3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # a malformed frame: an error, then closed
        raw.connect(service.path)
        raw.sendall((3).to_bytes(4, "little") + (0).to_bytes(4, "little") + b"{x}")
        reply, _ = read_frame(raw)
        assert "error" in reply
    assert store.stats()["entries"] == 1  # still serving
    with pytest.raises(StoreError, match="store service at"):
        RemoteStore(service.path + ".gone", namespace())
    bad = dict(namespace(stage="z"), spec={"kind": "memory", "max_entries": 0})
    with pytest.raises(StoreError, match="max_entries"):
        RemoteStore(service.path, bad)


def _serve_in(path_queue):
    svc = StoreService()
    path_queue.put(svc.start())
    time.sleep(600)


def test_a_store_in_another_process_and_a_dead_service():
    """As the supervisor holds it: the service in another process; when it is gone, calls fail with
    StoreError (the stage's failure policy) instead of hanging."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve_in, args=(q,), daemon=True)
    proc.start()
    try:
        store = RemoteStore(q.get(timeout=60), namespace())
        (dist,) = store.observe_batch([("c", np.ones(1, np.uint64), np.ones((1, 8), np.float32))], 4, 1.0)
        assert np.isinf(dist).all()
        proc.kill()
        proc.join(30)
        with pytest.raises(StoreError):
            store.stats()
    finally:
        proc.kill()
