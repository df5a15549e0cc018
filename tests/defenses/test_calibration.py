"""Calibration: the order-statistic threshold, measured FPR/TPR, AUC, and the held-out FPR lying
within statistical tolerance of the target."""

import math

import numpy as np
import pytest
import torch

from robustgate.defenses import calibration as cal


def test_threshold_is_the_documented_order_statistic():
    s = np.arange(1, 101, dtype=float)  # 1..100, shuffled order must not matter
    rng = np.random.default_rng(0)
    rng.shuffle(s)
    assert cal.threshold_at_fpr(s, 0.01) == 99.0  # k = ceil(0.99 * 100) = 99
    assert cal.threshold_at_fpr(s, 0.05) == 95.0
    assert cal.threshold_at_fpr(s, 0.015) == 99.0  # k = ceil(98.5) = 99
    assert cal.fpr(s, 99.0) == pytest.approx(0.01)  # only 100 > 99
    assert cal.threshold_at_fpr(np.arange(1.0, 11.0), 0.01) == 10.0  # k = ceil(9.9) = 10: nothing flagged


def test_validation_fpr_never_exceeds_target_even_with_ties():
    s = torch.tensor([0.0] * 50 + [1.0] * 50)
    t = cal.threshold_at_fpr(s, 0.2)
    assert t == 1.0 and cal.fpr(s, t) == 0.0
    for n in (7, 99, 1000, 1001):
        x = np.random.default_rng(n).normal(size=n)
        for target in (0.01, 0.05, 0.1):
            assert cal.fpr(x, cal.threshold_at_fpr(x, target)) <= target
            assert cal.fpr(x, cal.threshold_at_fpr(x, target)) == math.floor(target * n + 1e-9) / n


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_target_fpr_out_of_range_raises(bad):
    with pytest.raises(ValueError, match="target_fpr must lie in"):
        cal.threshold_at_fpr([1.0, 2.0], bad)


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="empty"):
        cal.threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError, match="NaN/Inf"):
        cal.calibrate([1.0, float("nan")], target_fpr=0.01)


@pytest.mark.parametrize("dist", ["normal", "exponential"])
def test_held_out_fpr_within_binomial_tolerance(dist):
    rng = np.random.default_rng(1)
    draw = {"normal": lambda n: rng.normal(size=n), "exponential": lambda n: rng.exponential(size=n)}[dist]
    n_val, n_test = 5000, 20000
    for _ in range(5):
        rec = cal.calibrate(draw(n_val), draw(n_test), target_fpr=0.01)
        assert abs(rec["test_fpr"] - 0.01) <= cal.fpr_tolerance(0.01, n_val, n_test)
    # the tolerance is not vacuous: a threshold at the 98% quantile is far outside it
    wrong = cal.threshold_at_fpr(draw(n_val), 0.02)
    assert cal.fpr(draw(n_test), wrong) - 0.01 > cal.fpr_tolerance(0.01, n_val, n_test)


def test_binomial_bound():
    assert cal.binomial_fpr_bound(0.01, 1000, alpha=1e-3) == pytest.approx(0.021, abs=0.003)
    assert cal.binomial_fpr_bound(0.01, 100000) < 0.0115


def test_tpr_auc_quantiles_and_record():
    clean, adv = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.35, 0.5, 0.6])
    assert cal.tpr(adv, 0.45) == pytest.approx(2 / 3)
    assert cal.roc_auc(clean, adv) == pytest.approx(11 / 12)  # one (0.4, 0.35) pair misordered
    assert cal.roc_auc(adv, clean) == pytest.approx(1 / 12)
    q = cal.quantiles(np.arange(101.0))
    assert q["q0.5"] == 50.0 and q["q0.99"] == 99.0 and q["min"] == 0.0 and q["max"] == 100.0
    rec = cal.calibrate(np.arange(100.0), np.arange(50.0) + 60, target_fpr=0.05)
    assert set(rec) == {"target_fpr", "threshold", "val_fpr", "test_fpr", "n_val", "n_test", "quantiles"}
    assert rec["threshold"] == 94.0 and rec["val_fpr"] == 0.05
    assert rec["n_test"] == 50 and rec["test_fpr"] == pytest.approx(15 / 50)  # 95..109 > 94
    assert cal.calibrate([1.0, 2.0], target_fpr=0.5)["test_fpr"] is None
