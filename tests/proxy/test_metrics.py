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
