"""The k-NN stateful method (defenses/stateful/knn.py, knn_store.py): its scoring rule against a
hand computation, retries, the store's bounds, configuration errors, and fit end to end on tiny data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from robustgate.defenses.base import FitData, build
from robustgate.defenses.stateful.knn import KnnDetector, attack_delta, contrastive_loss, knn_scores, pool_factor
from robustgate.defenses.stateful.knn_store import KnnMemoryStore


def _d(*values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def _e(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.float16)


def test_scores_are_the_mean_distance_to_the_k_nearest_earlier_queries():
    store = KnnMemoryStore(max_entries=64, max_per_client=64, ttl_s=100.0)
    emb = _e([0, 0], [3, 4], [0, 1], [6, 8], [0, 2])
    dist = store.observe("a", _d(1, 2, 3, 4, 5), emb, k=2, now=0.0)
    # by hand: query 2 = (0,1): distances 1 (to (0,0)) and sqrt(9+9) (to (3,4)); query 4 = (0,2):
    # to (0,0) 2, (3,4) sqrt(13), (0,1) 1, (6,8) sqrt(72) -> nearest 1, 2
    assert np.isinf(dist[0]).all() and dist[1][0] == 5 and np.isinf(dist[1][1])
    np.testing.assert_allclose(dist[2], [1, np.sqrt(18)], rtol=1e-6)
    np.testing.assert_allclose(dist[3], [5, np.sqrt(36 + 49)], rtol=1e-6)
    np.testing.assert_allclose(dist[4], [1, 2], rtol=1e-6)
    scores = knn_scores(dist, "mean")
    assert scores[:2].tolist() == [0.0, 0.0]  # fewer than k earlier queries: never flagged
    np.testing.assert_allclose(scores[2:], 1 / (1 + np.array([(1 + np.sqrt(18)) / 2, (5 + np.sqrt(85)) / 2, 1.5])), rtol=1e-6)
    kth = knn_scores(dist, "kth")  # the k-th nearest: the largest of the k
    assert kth[:2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(kth[2:], 1 / (1 + np.array([np.sqrt(18), np.sqrt(85), 2.0])), rtol=1e-6)
    with pytest.raises(ValueError, match="statistic"):
        knn_scores(dist, "median")
    # one call or one query at a time: the same distances
    other = KnnMemoryStore(max_entries=64, max_per_client=64, ttl_s=100.0)
    one = np.concatenate([other.observe("a", _d(i + 1), emb[i:i + 1], k=2, now=0.0) for i in range(5)])
    np.testing.assert_array_equal(one, dist)
    # clients are separate
    assert np.isinf(store.observe("b", _d(6), _e([0, 0]), k=1, now=0.0)).all()


def test_exact_retries_are_never_evidence_and_not_recorded():
    store = KnnMemoryStore(max_entries=64, max_per_client=64, ttl_s=100.0)
    emb = _e([0, 0], [0, 1], [0, 0], [0, 1])
    dist = store.observe("a", _d(1, 2, 1, 2), emb, k=1, now=0.0)  # queries 2 and 3 resend 0 and 1
    assert np.isinf(dist[2]).all() and np.isinf(dist[3]).all()
    assert store.stats()["entries"] == 2
    assert np.isinf(store.observe("a", _d(2), _e([0, 1]), k=1, now=1.0)).all()  # a retry in a later call
    np.testing.assert_allclose(store.observe("a", _d(3), _e([0, 1]), k=1, now=1.0), [[0.0]])  # same picture, new bytes


def test_bounds_per_client_global_ttl_and_lru():
    # max_per_client 2: the third-oldest query is forgotten
    store = KnnMemoryStore(max_entries=100, max_per_client=2, max_clients=2, ttl_s=10.0)
    store.observe("a", _d(1, 2, 3), _e([0, 0], [10, 0], [20, 0]), k=1, now=0.0)
    np.testing.assert_allclose(store.observe("a", _d(4), _e([0, 0]), k=2, now=0.0), [[10, 20]])  # not 0: (0,0) is gone
    assert store.stats()["entries"] == 2
    # ttl: older than 10 s is forgotten
    assert np.isinf(store.observe("a", _d(5), _e([0, 0]), k=1, now=20.0)).all()
    # max_clients 2: a third client pushes out the least recently active one
    store.observe("b", _d(1), _e([5, 5]), k=1, now=20.0)
    store.observe("a", _d(6), _e([1, 1]), k=1, now=20.0)
    store.observe("c", _d(1), _e([7, 7]), k=1, now=20.0)  # b is forgotten
    assert np.isinf(store.observe("b", _d(2), _e([5, 5]), k=1, now=20.0)).all()
    assert store.stats()["clients"] == 2
    # max_entries 3: the oldest queries of any client fall out first
    glob = KnnMemoryStore(max_entries=3, max_per_client=3, max_clients=8, ttl_s=100.0)
    glob.observe("a", _d(1), _e([0, 0]), k=1, now=0.0)
    glob.observe("b", _d(1, 2, 3), _e([1, 0], [2, 0], [3, 0]), k=1, now=0.0)
    assert np.isinf(glob.observe("a", _d(2), _e([0, 0]), k=1, now=0.0)).all()  # a's query was pushed out
    assert glob.stats()["entries"] == 3
    # a bound that moves inside one call: each query sees what one-at-a-time calls would
    one = KnnMemoryStore(max_entries=4, max_per_client=2, ttl_s=100.0)
    many = KnnMemoryStore(max_entries=4, max_per_client=2, ttl_s=100.0)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(9, 4)).astype(np.float16)
    digests = _d(1, 2, 3, 2, 4, 5, 6, 7, 1)
    want = np.concatenate([one.observe("a", digests[i:i + 1], emb[i:i + 1], k=2, now=0.0) for i in range(9)])
    got = many.observe("a", digests, emb, k=2, now=0.0)  # the same up to float32 rounding (other BLAS calls)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    assert {k: one.stats()[k] for k in ("entries", "clients")} == {k: many.stats()[k] for k in ("entries", "clients")}
    with pytest.raises(ValueError, match="dimensions"):
        many.observe("a", _d(9), np.zeros((1, 3), dtype=np.float16), k=1)
    with pytest.raises(ValueError, match="k must be"):
        many.observe("a", _d(9), emb[:1], k=0)


def test_memory_follows_the_live_entries():
    store = KnnMemoryStore(max_entries=1000, max_per_client=1000, max_clients=10, ttl_s=100.0)
    emb = np.zeros((1000, 32), dtype=np.float16)
    store.observe("a", np.arange(1, 1001, dtype=np.uint64), emb, k=1, now=0.0)
    full = store.stats()["bytes"]
    assert full >= 1000 * 64 and store.stats()["entries"] == 1000
    store.observe("b", np.arange(1, 1001, dtype=np.uint64), emb, k=1, now=0.0)  # pushes all of a's out
    stats = store.stats()
    assert stats["entries"] == 1000 and stats["bytes"] < 1.5 * full
    recount = store._owner.nbytes + sum(h.nbytes() + 200 for h in store._clients.values())
    assert stats["bytes"] == recount  # the running count is the buffers' size
    store.clear()
    assert store.stats() == {"entries": 0, "clients": 0, "bytes": store._owner.nbytes}


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="method must be one of"):
        build("stateful", method="lsh")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        build("stateful", method="knn", k=0)
    with pytest.raises(ValueError, match="eps must be"):
        build("stateful", method="knn", eps=2.0)
    with pytest.raises(ValueError, match="statistic must be one of"):
        build("stateful", method="knn", statistic="median")
    with pytest.raises(ValueError, match="max_side must be a positive integer, got 0"):
        build("stateful", method="knn", max_side=0)
    with pytest.raises(TypeError):
        build("stateful", method="knn", top_k=20)  # a Blacklight parameter
    from robustgate.defenses.assemble import PipelineConfig, build_stages

    def stage(**over):
        return PipelineConfig.model_validate({"stages": [{"name": "sd", "kind": "stateful", "threshold": 0.5, **over}]})

    with pytest.raises(ValueError, match=r"pipeline\.stages\.0 \(sd\): store: store\.kind must be one of"):
        build_stages(stage(params={"method": "knn"}, store={"kind": "etcd"}), None)
    with pytest.raises(ValueError, match=r"store: .*max_per_client"):
        build_stages(stage(params={"method": "knn"}, store={"kind": "memory", "max_per_client": 0}), None)
    with pytest.raises(ValueError, match=r"store: .*hashes_per_query"):
        build_stages(stage(params={"method": "knn"}, store={"kind": "memory", "hashes_per_query": 20}), None)
    # without a bundle the encoder is missing: the stage says so when it first encodes
    det = build_stages(stage(params={"method": "knn"}), None)[0].defense
    with pytest.raises(ValueError, match="no encoder loaded; fit it first"):
        det.observe("a", torch.zeros(1, 1, 28, 28))


def test_the_stage_kind_has_the_detectors_defaults():
    """`kind: stateful` (what `robustgate fit --defense stateful` builds) repeats each method's
    parameters in its own signature: a default changed in one place only was once fitted as the old one."""
    import inspect

    from robustgate.defenses.stateful.blacklight import Blacklight
    from robustgate.defenses.stateful.stage import StatefulBlacklight, StatefulKnn

    for stage_cls, detector_cls in ((StatefulKnn, KnnDetector), (StatefulBlacklight, Blacklight)):
        stage = inspect.signature(stage_cls).parameters
        detector = inspect.signature(detector_cls).parameters
        assert set(detector) <= set(stage), stage_cls.__name__
        defaults = {n: p.default for n, p in detector.items()}
        assert {n: stage[n].default for n in detector} == defaults, stage_cls.__name__
    assert build("stateful", method="knn").width == KnnDetector().width == 16


def test_training_views_stay_in_the_ball_and_the_loss_separates():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    delta = attack_delta(x, 0.1, g)
    assert delta.shape == x.shape and float(delta.abs().max()) <= 0.1 + 1e-6
    e = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    # positives at distance 0, negatives beyond the margin: no loss; negatives at 0: margin^2
    assert float(contrastive_loss(e, e.clone(), 1.0)) == 0.0
    assert float(contrastive_loss(torch.zeros(2, 2), torch.zeros(2, 2), 1.0)) == pytest.approx(1.0)


def test_the_pool_factor_brings_the_longer_side_to_at_most_max_side():
    assert [pool_factor(h, w, 64) for h, w in ((28, 28), (32, 32), (64, 64), (65, 10), (96, 96), (224, 224),
                                                (224, 320))] == [1, 1, 1, 2, 2, 4, 5]
    assert pool_factor(224, 224, 224) == 1 and pool_factor(224, 224, 1) == 224


# 3x96x96: larger than max_side 64, so the encoder average-pools by 2 in front of its convolutions
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 96, 96)])
def test_fit_save_load_and_observe_any_shape(shape, tmp_path):
    import onnx

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, *shape, generator=g)
    det = KnnDetector(k=2, dim=8, width=4, steps=20, batch_size=16)
    assert build("stateful", **{**det.config(), "method": "knn"}).config() == {**det.config(), "method": "knn"}
    det.fit(FitData(x, torch.zeros(64), x[:8], torch.zeros(8)))
    assert det.save(tmp_path) == {"encoder_onnx": "encoder.onnx"}
    pools = [n for n in onnx.load(str(tmp_path / "encoder.onnx")).graph.node if n.op_type == "AveragePool"]
    want_pool = pool_factor(*shape[1:], 64)
    assert det.encoder.pool == want_pool
    assert [[a.ints for a in n.attribute if a.name == "kernel_shape"][0] for n in pools] == (
        [[want_pool, want_pool]] if want_pool > 1 else [])
    served = KnnDetector(k=2, dim=8, width=4, store=KnnMemoryStore(max_entries=100, max_per_client=100))
    served.load_artifacts({"encoder_onnx": tmp_path / "encoder.onnx"})
    with torch.no_grad():
        want = det.encoder(x[:4]).numpy()
    np.testing.assert_allclose(served.embed(x[:4]), want, rtol=1e-4, atol=1e-5)  # ONNX = torch
    s = served.observe("a", torch.cat([x[:3], x[:1]]))
    assert s[:2].tolist() == [0.0, 0.0] and float(s[2]) > 0 and float(s[3]) == 0.0  # too early; judged; a retry
    with pytest.raises(ValueError, match="fitted for"):
        served.observe("a", torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="embeds in 8 dimensions, dim is 16"):
        KnnDetector(dim=16).load_artifacts({"encoder_onnx": tmp_path / "encoder.onnx"})


def test_fit_end_to_end_into_a_bundle(tiny_bundle, fmnist_subset, tmp_path):
    from robustgate.defenses.base import build_from_bundle
    from robustgate.defenses.cli import fit_defense
    from robustgate.models.bundle import Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    x, y = fmnist_subset("val", 900)
    splits = {"train": (x[:300], y[:300]), "val": (x[300:600], y[300:600]), "test": (x[600:], y[600:])}
    spec = fit_defense(bundle, "stateful", name="sd", params={"method": "knn", "k": 3, "steps": 100, "batch_size": 32},
                       target_fpr=0.05, splits=splits, log=lambda *_: None)
    fitted = Bundle.load(bundle).spec.defenses["sd"]  # verifies the sha256
    assert fitted.params["method"] == "knn" and fitted.params["k"] == 3 and "store" not in fitted.params
    assert set(fitted.files) == {"encoder_onnx"} and (bundle / "defenses" / "sd" / "encoder.onnx").is_file()
    assert 0 < fitted.threshold == spec["threshold"] < 1
    assert fitted.calibration["val_fpr_upper"] <= 0.05 and fitted.calibration["n_val"] > 300
    # two kinds of benign client (defenses/cli.py): the larger threshold is kept, each kind meets the target
    kinds = fitted.calibration["kinds"]
    assert kinds["near_copies"]["n_val"] == 300 * 3  # every image and its k - 1 = 2 near-copies
    assert fitted.threshold == max(k["threshold"] for k in kinds.values())
    assert all(k["val_fpr_upper"] <= 0.05 for k in kinds.values())
    assert len(fitted.calibration["fit"]["report"]["loss"]) >= 1
    # the served stage: the bundle's encoder and threshold; an attack-like stream is flagged from query k + 1
    det = build_from_bundle("stateful", "sd", {"store": KnnMemoryStore(max_entries=1000, max_per_client=1000)}, None, Bundle.load(bundle),
                            where="test")
    assert det.threshold == fitted.threshold
    g = torch.Generator().manual_seed(1)
    base = fmnist_subset("test", 1)[0]
    attack = (base + (torch.rand(8, 1, 28, 28, generator=g) * 2 - 1) * 0.03).clamp(0, 1)
    flagged = det.is_adversarial(det.observe("attacker", attack)).tolist()
    assert flagged[:3] == [False] * 3 and all(flagged[3:]), flagged
    # a reload keeps the store for the same encoder, not for a refitted one (its embeddings differ)
    from robustgate.defenses.assemble import PipelineConfig, build_stages

    cfg = PipelineConfig.model_validate({"stages": [{"name": "sd", "kind": "stateful", "store": {"kind": "memory"}}]})
    first = build_stages(cfg, Bundle.load(bundle))[0].defense
    stores = {"sd": (first.store_spec, first.store)}
    assert build_stages(cfg, Bundle.load(bundle), stores=stores)[0].defense.store is first.store
    fit_defense(bundle, "stateful", name="sd", params={"method": "knn", "k": 3, "steps": 5, "batch_size": 32, "seed": 1},
                target_fpr=0.05, splits=splits, log=lambda *_: None)
    assert build_stages(cfg, Bundle.load(bundle), stores=stores)[0].defense.store is not first.store
    # a checksum mismatch refuses the bundle
    path = bundle / "defenses" / "sd" / "encoder.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(Exception, match="sha256|checksum"):
        Bundle.load(bundle)
    assert yaml.safe_load((bundle / "bundle.yaml").read_text())["defenses"]["sd"]["kind"] == "stateful"


def _reference(calls, k, max_entries, max_per_client, max_clients, ttl_s):
    """The module docstring's rule written out query by query: per call ``(now, [(client, digests, emb)])``
    -> the ``[N, k]`` distances of every group, from lists of entries (no buffers, no shortcuts).
    The TTL is applied when the store trims: after a call that records queries, for its client and for
    the clients whose entries it pushed out of the global bound, the oldest entries still within the
    other bounds are dropped while older than ``now - ttl_s``; a dropped entry stays dropped when the
    clock later steps back (the rule alone would bring it back)."""
    entries = []  # (client, seq, client index, time, digest, embedding float64)
    dropped = set()  # seqs of the entries the TTL dropped
    count, order, seq, out = {}, [], 0, []

    def within(x, c):  # the bounds that do not depend on the clock
        return x[1] > seq - max_entries and count.get(c, 0) - x[2] <= max_per_client

    for now, groups in calls:
        for client, digests, emb in groups:
            if client in order:
                order.remove(client)
            order.append(client)
            if len(order) > max_clients:  # the least recently active client is forgotten
                gone = order.pop(0)
                entries = [e for e in entries if e[0] != gone]
                count.pop(gone, None)
            rows, seq_before = [], seq
            for d, e in zip(digests.tolist(), emb.astype(np.float64)):
                c = count.get(client, 0)
                live = [x for x in entries if x[0] == client and x[1] > seq - max_entries
                        and c - x[2] <= max_per_client and now - x[3] <= ttl_s and x[1] not in dropped]
                if any(x[4] == d for x in live):  # an exact retry: no evidence, not recorded
                    rows.append(np.full(k, np.inf))
                    continue
                dist = sorted(float(np.linalg.norm(e - x[5])) for x in live)[:k]
                rows.append(np.array(dist + [np.inf] * (k - len(dist))))
                seq += 1
                entries.append((client, seq, c, now, d, e))
                count[client] = c + 1
            if seq > seq_before:  # the trim: this client's and the pushed-out entries' owners'
                owners = {client} | {x[0] for x in entries if seq_before - max_entries < x[1] <= seq - max_entries}
                for o in owners:
                    for x in sorted((x for x in entries if x[0] == o and within(x, o)), key=lambda x: x[1]):
                        if x[1] in dropped:
                            continue
                        if not x[3] < now - ttl_s:
                            break
                        dropped.add(x[1])
            out.append(np.array(rows))
    return out


@pytest.mark.parametrize("path", ["compiled", "numpy"])
@pytest.mark.parametrize("seed,most", [(0, 5), (1, 5), (2, 5), (4, 5), (9, 5), (3, 1), (4, 1), (9, 1)])
def test_store_equals_the_rule_written_out_with_clock_steps_back(seed, most, path):
    """Random streams of several clients with retries, tight bounds (global, per client, TTL, LRU) and
    a clock that sometimes steps back (the store's rows then leave its fast path): the store's
    distances are the reference's (float32 arithmetic vs float64). ``most``: queries per client and
    call at most (1: every call takes the one-query path while the client's times are monotone).
    ``path``: the one-query path's numba-compiled scan, or the numpy one (an environment without numba)."""
    rng = np.random.default_rng(seed)
    bounds = dict(max_entries=int(rng.integers(8, 40)), max_per_client=int(rng.integers(3, 12)),
                  max_clients=int(rng.integers(2, 5)), ttl_s=float(rng.choice([1.0, 3.0])))
    store = KnnMemoryStore(**bounds)
    if path == "numpy":
        store._step = None
    elif store._step is None:
        pytest.skip("numba is not installed: the store takes the numpy path (tested beside)")
    pool = rng.normal(size=(12, 6)).astype(np.float16)
    calls, now = [], 0.0
    for _ in range(80):
        now += float(rng.choice([0.0, 0.3, 1.2, -0.8], p=[0.3, 0.4, 0.2, 0.1]))
        groups = []
        for c in rng.choice(6, size=int(rng.integers(1, 4)), replace=False):
            ids = rng.integers(0, 12, int(rng.integers(1, most + 1)))
            emb = (pool[ids] + rng.normal(0, 0.1, (ids.size, 6))).astype(np.float16)
            groups.append((f"c{c}", (ids + 1).astype(np.uint64), emb))
        calls.append((now, groups))
    k = 3
    want = _reference(calls, k, **bounds)
    got = [d for now, groups in calls for d in store.observe_batch(groups, k, now)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
        np.testing.assert_allclose(g[np.isfinite(g)], w[np.isfinite(w)], rtol=1e-4, atol=1e-4)


def test_compiled_scan_equals_numpy_on_long_histories():
    """The compiled one-query scan against numpy's distances on a real-sized history (3,000 rows of
    32 dimensions, a live suffix): the same k nearest within float32
    rounding, inf-padded past the rows, the query's squared norm returned, and a digest anywhere in
    the live rows is a retry (-1)."""
    from robustgate.defenses.stateful.knn_store import k_smallest, pairwise_sq, scan_kernel

    scan = scan_kernel()
    if scan is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3000, 32)).astype(np.float32)
    sq = np.einsum("nd,nd->n", emb, emb)
    dig = np.arange(1, 3001, dtype=np.uint64)
    q = rng.normal(size=32).astype(np.float32)
    for first, near, end, k in ((0, 0, 3000, 4), (1234, 1234, 3000, 4), (1234, 2744, 3000, 4), (2998, 2998, 3000, 4),
                                (5, 5, 5, 3)):
        out = np.empty(k, np.float32)  # near > first: the window, the last end - near rows
        np.testing.assert_allclose(scan(emb, sq, dig, first, near, end, q, np.uint64(0), out), q @ q, rtol=1e-5)
        want = np.sqrt(k_smallest(pairwise_sq(q[None], emb[near:end], sq[near:end]), k))[0] if end > near \
            else np.full(k, np.inf, np.float32)
        np.testing.assert_array_equal(np.isinf(out), np.isinf(want))
        np.testing.assert_allclose(out[np.isfinite(out)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)
    assert scan(emb, sq, dig, 1234, 1234, 3000, q, np.uint64(2000), np.empty(4, np.float32)) == -1  # a live digest
    assert scan(emb, sq, dig, 1234, 2900, 3000, q, np.uint64(2000), np.empty(4, np.float32)) == -1  # outside the window
    assert scan(emb, sq, dig, 1234, 1234, 3000, q, np.uint64(1000), np.empty(4, np.float32)) >= 0  # a dead one


@pytest.mark.parametrize("path", ["compiled", "numpy"])
def test_window_limits_the_neighbours_to_the_last_queries_on_every_path(path):
    """``window``: each query's neighbours are the client's last ``window`` remembered queries before
    it (retries are still recognised over the whole history), the same whether the queries come one
    per call or several per call, against a brute force. ``path``: numba's compiled scan, query after
    query; or numpy (an environment without numba): one query per call, the vectorised general path
    for several."""
    from robustgate.defenses.stateful.knn_store import KnnMemoryStore

    rng = np.random.default_rng(5)
    emb = rng.normal(size=(120, 6)).astype(np.float32)
    dig = np.arange(1, 121, dtype=np.uint64)
    dig[[40, 90]] = dig[[3, 85]]  # exact retries: one far outside the window, one inside it
    k, window = 3, 10
    one, many = (KnnMemoryStore(max_entries=1000, max_per_client=500) for _ in range(2))
    if path == "numpy":
        one._step = many._step = None
    elif one._step is None:
        pytest.skip("numba is not installed: the store takes the numpy path (tested beside)")
    got_one = np.concatenate([one.observe("c", dig[i:i + 1], emb[i:i + 1], k, 1.0, window) for i in range(120)])
    cuts = [0, 1, 5, 6, 30, 31, 44, 70, 71, 120]
    got_many = np.concatenate([many.observe("c", dig[a:b], emb[a:b], k, 1.0, window) for a, b in zip(cuts, cuts[1:])])
    kept, want = [], []
    for i in range(120):
        if dig[i] in dig[kept]:
            want.append(np.full(k, np.inf, np.float32))
            continue
        near = np.sort(np.linalg.norm(emb[kept[-window:]] - emb[i], axis=1)) if kept else np.zeros(0)
        want.append(np.concatenate([near[:k], np.full(max(0, k - near.size), np.inf)]).astype(np.float32))
        kept.append(i)
    want = np.stack(want)
    for got in (got_one, got_many):
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-4, atol=1e-4)
    assert np.isinf(got_one[[40, 90]]).all()  # both retries, inside the window or not
    with pytest.raises(ValueError, match="window"):
        one.observe("c", dig[:1], emb[:1], k, 1.0, 0)
    from robustgate.defenses.stateful.stage import Stateful

    with pytest.raises(ValueError, match="window must be an integer >= k"):
        Stateful(method="knn", k=4, window=3)
    assert Stateful(method="knn").config()["window"] == 256 and Stateful(method="knn", window=None).window is None


def test_the_fused_path_step_calls_no_torch_function(monkeypatch):
    """``observe_clients`` on the fused path's float32 array and embedding (input checked by the codec)
    calls no torch function -- each releases the GIL, which a batch worker then waits to take back
    (defenses/assemble.py ``_run_fused``) -- and gives what the tensor path gives: the same scores,
    the same blocks."""
    from robustgate.defenses.pipeline import Stage, observe_clients
    from robustgate.defenses.stateful.stage import Stateful

    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 4, 4), dtype=np.float32)
    base = rng.standard_normal(8).astype(np.float32)
    emb = base + 1e-3 * rng.standard_normal((5, 8)).astype(np.float32)  # near-copies: client "a" is flagged
    clients = ["a", "a", "a", "b", "a"]

    def stage():
        return Stage("s", Stateful(method="knn", k=2, dim=8, threshold=0.5, store=KnnMemoryStore()), "block",
                     block_after=1, cooldown_s=60.0)

    want = observe_clients(stage(), torch.from_numpy(x), clients, torch.from_numpy(emb), checked=True)

    def no_torch(*args, **kwargs):
        raise AssertionError("a torch call on the fused path")

    fused = stage()
    for name in ("from_numpy", "tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, no_torch)
    monkeypatch.setattr(torch.Tensor, "numpy", no_torch)
    got = observe_clients(fused, x, clients, emb, checked=True)
    monkeypatch.undo()
    assert isinstance(got[0], np.ndarray) and got[0].dtype == np.float32
    np.testing.assert_array_equal(got[0], want[0])
    assert got[0][2] > 0.5 and got[1][0] is not None and got[1][3] is None  # "a" detected and blocked, "b" not
    assert [e is None for e in got[1]] == [e is None for e in want[1]]
