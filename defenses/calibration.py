"""Calibration of detector thresholds to a target false-positive rate (pure functions).

A detector flags an item when ``score > threshold`` (defenses.base.Detector.is_adversarial).
The threshold is chosen on held-out *clean validation* scores so that at most a fraction
``target_fpr`` of them is flagged:

    threshold = s_(k),  k = ceil((1 - target_fpr) * n)        (1-indexed order statistic)

where ``s_(1) <= ... <= s_(n)`` are the sorted validation scores. Exactly ``n - k`` scores lie
strictly above ``s_(k)`` when there are no ties (fewer with ties), and ``n - k <= floor(target_fpr
* n)``, so the *validation* FPR never exceeds the target and equals ``floor(target_fpr * n) / n``
for continuous scores. On fresh clean data the FPR is a binomial proportion around the target
(``binomial_fpr_bound`` gives the tolerance the tests use).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import binom
from sklearn.metrics import roc_auc_score

QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def _np(scores: torch.Tensor | np.ndarray | list[float]) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    a = np.asarray(scores, dtype=np.float64).reshape(-1)  # [N]
    if a.size == 0:
        raise ValueError("calibration needs at least one score, got an empty array")
    if not np.isfinite(a).all():
        raise ValueError(f"calibration scores contain {int((~np.isfinite(a)).sum())} NaN/Inf values")
    return a


def _check_fpr(target_fpr: float) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")


def threshold_at_fpr(clean_scores, target_fpr: float = 0.01) -> float:
    """The order statistic ``s_(ceil((1 - target_fpr) * n))`` of the clean scores (see module
    docstring): flagging ``score > threshold`` flags at most ``target_fpr`` of them."""
    _check_fpr(target_fpr)
    s = np.sort(_np(clean_scores))
    n = s.size
    # 1e-9 guards against (1 - 0.01) * 1000 = 990.0000000000001 rounding up to 991
    k = min(n, max(1, math.ceil((1.0 - target_fpr) * n - 1e-9)))
    return float(s[k - 1])


def fpr(clean_scores, threshold: float) -> float:
    """Fraction of clean items flagged (``score > threshold``)."""
    return float((_np(clean_scores) > threshold).mean())


def tpr(adv_scores, threshold: float) -> float:
    """Fraction of adversarial items flagged (``score > threshold``)."""
    return float((_np(adv_scores) > threshold).mean())


def roc_auc(clean_scores, adv_scores) -> float:
    """ROC AUC of separating adversarial (positive) from clean (negative) by score."""
    c, a = _np(clean_scores), _np(adv_scores)
    y = np.concatenate([np.zeros(c.size), np.ones(a.size)])
    return float(roc_auc_score(y, np.concatenate([c, a])))


def quantiles(scores, qs: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """``{"q0.5": ..., "q0.99": ...}`` (numpy's default linear interpolation), plus min and max."""
    s = _np(scores)
    out = {f"q{q:g}": float(np.quantile(s, q)) for q in qs}
    out["min"], out["max"] = float(s.min()), float(s.max())
    return out


def binomial_fpr_bound(target_fpr: float, n: int, alpha: float = 1e-3) -> float:
    """Upper end of the one-sided ``1 - alpha`` range of the FPR measured on ``n`` fresh clean
    items when the true FPR is ``target_fpr``: ``P(measured > bound) <= alpha``."""
    _check_fpr(target_fpr)
    return float(binom.ppf(1.0 - alpha, n, target_fpr) / n)


def fpr_tolerance(target_fpr: float, n_val: int, n_test: int, z: float = 4.0) -> float:
    """``z`` standard deviations of (test FPR - target) when the threshold is an order statistic
    of ``n_val`` clean scores and the FPR is measured on ``n_test`` fresh ones: the threshold's own
    true FPR has variance ~ ``p(1-p)/n_val`` (order-statistic quantile), the measurement adds
    ``p(1-p)/n_test``; plus ``1/n_val`` for the floor in the order-statistic index."""
    _check_fpr(target_fpr)
    p = target_fpr
    return float(z * math.sqrt(p * (1 - p) * (1.0 / n_val + 1.0 / n_test)) + 1.0 / n_val)


def calibrate(val_scores, test_scores=None, target_fpr: float = 0.01) -> dict[str, Any]:
    """The calibration record stored in bundle.yaml under ``defenses.<name>.calibration``:
    ``{target_fpr, threshold, val_fpr, test_fpr, n_val, n_test, quantiles}`` where
    ``quantiles`` are those of the validation scores (``test_fpr``/``n_test`` None without test)."""
    val = _np(val_scores)
    t = threshold_at_fpr(val, target_fpr)
    record: dict[str, Any] = {
        "target_fpr": float(target_fpr),
        "threshold": t,
        "val_fpr": fpr(val, t),
        "test_fpr": None,
        "n_val": int(val.size),
        "n_test": None,
        "quantiles": quantiles(val),
    }
    if test_scores is not None:
        test = _np(test_scores)
        record["test_fpr"], record["n_test"] = fpr(test, t), int(test.size)
    return record
