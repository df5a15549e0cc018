"""Calibrating Blacklight on benign Fashion-MNIST streams; a real query attack is caught within a few queries."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from robustgate.defenses.calibration import fpr, fpr_tolerance
from robustgate.defenses.stateful import Blacklight, MemoryStore
from robustgate.defenses.stateful.calibration import (NEAR_KINDS, benign_streams, calibrate_stateful, fpr_upper,
                                                      near_duplicate, stream_scores)

TARGET_FPR = 0.01


@pytest.fixture(scope="module")
def calibrated(fmnist_subset):
    """Blacklight calibrated on benign streams of 2,000 validation images; test streams from 2,000 test images;
    the entries of the detector's own store right after (the attack test below fills it later)."""
    val_x, _ = fmnist_subset("val", 2000)
    test_x, _ = fmnist_subset("test", 2000)
    det = Blacklight(store=MemoryStore(max_entries=100_000, max_per_client=10_000))
    val = benign_streams(val_x, 20, torch.Generator().manual_seed(0))
    test = benign_streams(test_x, 20, torch.Generator().manual_seed(1))
    record = calibrate_stateful(det, val, test, TARGET_FPR)
    return det, record, test, det.store.stats()["entries"]


def test_threshold_meets_the_target_fpr_on_held_out_benign_streams(calibrated):
    det, record, test, entries = calibrated
    assert record["threshold"] == det.threshold and record["val_fpr"] <= TARGET_FPR
    n_val, n_test = record["n_val"], record["n_test"]
    assert n_val > 2000 and n_test > 2000  # retries and near-duplicates are in the streams
    # the margin: the upper confidence bound, not only the measured rate, meets the target
    assert record["val_fpr_upper"] <= TARGET_FPR and record["keys"] == 3 and record["confidence"] == 0.95
    assert record["val_fpr"] < record["val_fpr_upper"]
    assert record["test_fpr"] <= TARGET_FPR + fpr_tolerance(TARGET_FPR, n_val, n_test)
    # the calibration ran on a private store: the detector's own history is untouched
    assert entries == 0
    # exact retries are never flagged
    scores = stream_scores(det, [("r", torch.cat([test[0][1][:5], test[0][1][:5]]))])
    assert (scores[5:] == 0).all()


def test_the_upper_bound_is_clopper_pearson_and_bad_arguments_are_named():
    assert fpr_upper(0, 1000) == pytest.approx(1 - 0.05 ** (1 / 1000))  # the exact bound at zero flagged
    assert fpr_upper(10, 1000) > 0.01 and fpr_upper(1000, 1000) == 1.0
    det = Blacklight(store=MemoryStore(max_entries=16, max_per_client=16))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate_stateful(det, [("a", x)], target_fpr=0.0)
    with pytest.raises(ValueError, match="keys"):
        calibrate_stateful(det, [("a", x)], keys=0)
    with pytest.raises(ValueError, match="confidence"):
        fpr_upper(1, 10, confidence=1.5)


def test_streams_hold_retries_and_every_near_duplicate_kind(fmnist_subset):
    x, _ = fmnist_subset("val", 50)
    g = torch.Generator().manual_seed(0)
    streams = benign_streams(x, 5, g, retry_rate=1.0, near_rate=1.0)
    assert [len(s) for _, s in streams] == [30] * 5  # image, retry, near-duplicate
    first = streams[0][1]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    for kind in NEAR_KINDS:
        y = near_duplicate(x[0], kind, g)
        assert y.shape == x[0].shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert 0 < float((y - x[0]).abs().mean()) < 0.1  # close to the original, not equal
    with pytest.raises(ValueError, match="near-duplicate kind"):
        near_duplicate(x[0], "blur", g)
    with pytest.raises(ValueError, match="retry_rate"):
        benign_streams(x, 2, g, retry_rate=2.0)


def _train(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _margin(model: nn.Module, x: torch.Tensor, y: int) -> float:
    with torch.no_grad():
        z = model(x)[0]
    other = torch.cat([z[:y], z[y + 1:]]).max()
    return float(z[y] - other)


def _square_attack(model, x, y, eps, queries, gen, observe):
    """Random search in the spirit of Square (Andriushchenko et al. 2020): vertical-stripe start,
    then a random square set to ±eps per step, kept when the margin drops. Every model query also
    goes to ``observe`` (the proxy's view); returns the index of the first flagged query or None,
    the number of queries sent and whether the attack succeeded."""
    first, sent = None, 0
    adv = (x + eps * torch.where(torch.rand(1, 1, 1, x.shape[-1], generator=gen) < 0.5, -1.0, 1.0)).clamp(0, 1)
    best = _margin(model, adv, y)
    for q in range(queries):
        sent += 1
        if observe(adv if q == 0 else cand, q) and first is None:
            first = q
        if best < 0:
            break
        side = 3
        i, j = torch.randint(0, x.shape[-1] - side, (2,), generator=gen).tolist()
        cand = adv.clone()
        sign = torch.where(torch.rand(()) < 0.5, -eps, eps)
        cand[..., i:i + side, j:j + side] = (x[..., i:i + side, j:j + side] + sign).clamp(0, 1)
        m = _margin(model, cand, y)
        if m < best:
            adv, best = cand, m
    return first, sent, best < 0


def test_a_query_attack_is_detected_within_a_few_queries(calibrated, fmnist_subset):
    det, _, _, _ = calibrated
    x, y = fmnist_subset("train", 4000)
    model = _train(x, y)
    test_x, test_y = fmnist_subset("test", 40)
    gen = torch.Generator().manual_seed(0)
    firsts, early = [], 0
    for k in range(len(test_x)):
        xi, yi = test_x[k:k + 1], int(test_y[k])
        if _margin(model, xi, yi) <= 0:
            continue
        client = f"attacker-{k}"

        def observe(q, _step, client=client):
            return bool(det.is_adversarial(det.observe(client, q))[0])

        first, sent, _ = _square_attack(model, xi, yi, 0.1, 200, gen, observe)
        if first is None:
            assert sent <= 3, f"an attack of {sent} queries went unflagged (threshold {det.threshold})"
            early += 1  # it fooled the model with its first queries, before a stream existed
        else:
            firsts.append(first)
    assert len(firsts) >= 20 and early <= len(firsts) // 4, (firsts, early)
    # query 0 is the attack's first image (nothing to match): the median attack is flagged at its
    # second query, every one by its sixth
    assert np.median(firsts) <= 1 and max(firsts) <= 5, (firsts, det.threshold)


def test_kinds_of_streams_each_meet_the_target_and_the_worst_kind_sets_the_threshold(fmnist_subset):
    """Streams of several kinds (``{kind: streams}``, what `robustgate fit` passes for the k-NN method):
    the threshold is the largest of the kinds' own, so that every kind meets the target by itself."""
    val_x, _ = fmnist_subset("val", 1000)
    test_x, _ = fmnist_subset("test", 1000)
    g = torch.Generator().manual_seed(0)

    def kinds(x):
        return {"mixed": benign_streams(x, 10, g),
                "near_copies": benign_streams(x, 10, g, retry_rate=0.0, near_rate=1.0, near_copies=3)}

    det = Blacklight(store=MemoryStore(max_entries=16, max_per_client=16))
    val = kinds(val_x)
    record = calibrate_stateful(det, val, kinds(test_x), TARGET_FPR)
    per = record["kinds"]
    assert set(per) == {"mixed", "near_copies"} and per["near_copies"]["n_val"] == 4000
    assert record["threshold"] == det.threshold == max(k["threshold"] for k in per.values())
    for k in per.values():  # each kind meets the target at the shared threshold, with the margin
        assert k["val_fpr"] <= k["val_fpr_upper"] <= TARGET_FPR and k["test_fpr"] is not None
    assert record["val_fpr_upper"] == max(k["val_fpr_upper"] for k in per.values())
    assert record["n_val"] == sum(k["n_val"] for k in per.values())
    # the same streams as one list: one threshold for the pool, never above the worst kind's
    pooled = calibrate_stateful(copy.copy(det), [s for v in val.values() for s in v], target_fpr=TARGET_FPR)
    assert "kinds" not in pooled and pooled["threshold"] <= record["threshold"]
    with pytest.raises(ValueError, match="kinds"):
        calibrate_stateful(det, val, {"mixed": val["mixed"]}, TARGET_FPR)
