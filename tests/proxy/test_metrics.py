"""The batch-observed score histogram exposes exactly what prometheus_client's Histogram would."""

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from robustgate.proxy.metrics import SCORE_BUCKETS, BatchHistogram


def samples(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def test_batch_histogram_matches_prometheus_client_histogram():
    rng = np.random.default_rng(0)
    # bucket bounds exactly (le is inclusive), values between and beyond them, non-finite ones skipped
    values = {"magnet": np.concatenate([np.asarray(SCORE_BUCKETS, float), rng.normal(0, 30, 500), [1e6, -1e6]]),
              "safetynet": np.asarray([np.nan, np.inf, -np.inf, 0.0, -0.1, 0.3])}
    ours_reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("robustgate_detector_score", "Raw detector scores", "detector", SCORE_BUCKETS, ours_reg)
    ref = Histogram("robustgate_detector_score", "Raw detector scores", ["detector"], registry=ref_reg,
                    buckets=SCORE_BUCKETS)
    for label, v in values.items():
        for chunk in np.array_split(v, 3):  # several batches accumulate
            ours.observe_many(label, chunk)
        for x in v.tolist():
            if np.isfinite(x):
                ref.labels(detector=label).observe(x)
    got, want = samples(ours_reg), samples(ref_reg)
    # prometheus_client drops _sum when a bucket bound is negative; ours keeps it
    assert set(got) - set(want) == {("robustgate_detector_score_sum", (("detector", d),)) for d in values}
    for key, value in want.items():
        assert got[key] == value, key
    for label, v in values.items():
        np.testing.assert_allclose(got[("robustgate_detector_score_sum", (("detector", label),))],
                                   v[np.isfinite(v)].sum(), rtol=1e-12)
    assert got[("robustgate_detector_score_count", (("detector", "safetynet"),))] == 3
    text = generate_latest(ours_reg).decode()
    assert '# TYPE robustgate_detector_score histogram' in text
    assert 'robustgate_detector_score_bucket{detector="magnet",le="+Inf"} 517.0' in text


def test_store_stats_are_read_off_the_callers_thread_one_read_at_a_time(monkeypatch):
    """Multiprocess mode: ``refresh`` (called by the event loop's health loop once a second) returns at
    once while a store's ``stats`` (a network call for a shared store) is still running; the read
    happens in one reader thread, and refreshes meanwhile make one more read, not a pile of them."""
    import threading

    from robustgate.proxy import metrics

    monkeypatch.setattr(metrics, "multiprocess", lambda: True)
    release, calls, threads = threading.Event(), [], set()

    class SlowStore:
        def stats(self):
            calls.append(1)
            threads.add(threading.current_thread().name)
            assert release.wait(30)
            return {"entries": 7, "clients": 2, "bytes": 100}

    reg = CollectorRegistry()
    stats = metrics.StoreStats(lambda: {"sd": SlowStore()}, reg)
    for _ in range(5):
        stats.refresh()  # returns although the first read is blocked
    assert not release.is_set()
    release.set()
    for _ in range(100):
        if samples(reg).get(("robustgate_stateful_entries", (("stage", "sd"),))) == 7:
            break
        threading.Event().wait(0.05)
    assert samples(reg)[("robustgate_stateful_entries", (("stage", "sd"),))] == 7
    assert threads == {"robustgate-store-stats"} and 1 <= len(calls) <= 2
