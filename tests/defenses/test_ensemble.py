"""Ensembles: test-time transformation ensembling and randomized smoothing."""

import math

import pytest
import torch
from scipy.stats import binomtest, norm

from robustgate.defenses.base import build
from robustgate.defenses.ensemble.smoothing import (
    ABSTAIN, certified_accuracy, certify, certify_from_counts, clopper_pearson_lower, predict, predict_from_counts,
)
from robustgate.defenses.ensemble.tte import PRESETS, parse_transform, shift_image
from robustgate.defenses.pipeline import REJECTED, DefendedModel, Stage


class RecordingClassifier:
    """Logits from fixed pixel weights; records every call's input."""

    def __init__(self, k=3, size=8, seed=0):
        self.w = torch.randn(k, size * size, generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.clone())
        return x.flatten(1) @ self.w.T


def hand_clopper_pearson_lower(k, n, alpha):
    """Solves P(X >= k | p) = alpha for p by bisection (X ~ Binomial(n, p)), from the definition."""
    def tail(p):
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < alpha else (lo, mid)
    return (lo + hi) / 2


# ---- TTE -------------------------------------------------------------------------------------

def test_tte_fan_out_is_one_classify_call_of_b_times_t_items():
    tte = build("tte")
    clf = RecordingClassifier(k=10, size=28)
    x = torch.rand(5, 1, 28, 28)
    result = DefendedModel([Stage("tte", tte)], clf)(x)
    assert tte.copies == len(PRESETS["fashion-mnist"]) == 6
    assert [c.shape[0] for c in clf.calls] == [5 * 6]
    sent = clf.calls[0].view(5, 6, 1, 28, 28)
    torch.testing.assert_close(sent[:, 0], x)  # item-major, identity first
    torch.testing.assert_close(sent[:, 1], x.flip(-1))  # then the horizontal flip
    expected = (x.flatten(1) @ clf.w.T).softmax(-1)  # [5, K]
    per_copy = (clf.calls[0].flatten(1) @ clf.w.T).softmax(-1).view(5, 6, -1).mean(1)
    torch.testing.assert_close(result.logits.softmax(-1), per_copy)
    assert not torch.allclose(per_copy, expected)  # the ensemble is not just the identity copy
    assert (result.verdict == 0).all() and result.radius is None


def test_tte_shift_moves_pixels_and_replicates_the_border():
    x = torch.arange(16.0).view(1, 1, 4, 4) / 15
    right = shift_image(x, 0, 1)
    torch.testing.assert_close(right[..., 1:], x[..., :-1])
    torch.testing.assert_close(right[..., 0], x[..., 0])
    down = shift_image(x, 1, 0)
    torch.testing.assert_close(down[..., 1:, :], x[..., :-1, :])
    up_left = shift_image(x, -1, -1)
    torch.testing.assert_close(up_left[..., :-1, :-1], x[..., 1:, 1:])


def test_tte_transform_grammar_and_custom_sets():
    t = parse_transform("hflip+dx=-2+dy=1")
    assert (t.hflip, t.dy, t.dx) == (True, 1, -2)
    assert build("tte", dataset="mnist").copies == 5  # digits are never flipped
    custom = build("tte", transforms=["id", "hflip+dx=1"])
    x = torch.rand(2, 1, 6, 6)
    out = custom.expand(x).view(2, 2, 1, 6, 6)
    torch.testing.assert_close(out[:, 1], shift_image(x.flip(-1), 0, 1))
    with pytest.raises(ValueError, match="unknown transform part 'rot90'"):
        build("tte", transforms=["rot90"])
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        build("tte", dataset="imagenet")
    with pytest.raises(ValueError, match="does not fit images"):
        build("tte", transforms=["dx=8"]).expand(torch.rand(1, 1, 8, 8))


def test_tte_aggregate_rejects_a_wrong_logit_count():
    with pytest.raises(ValueError, match=r"expected \[N\*6, K\] logits"):
        build("tte").aggregate(torch.zeros(7, 10))


# ---- randomized smoothing ----------------------------------------------------------------------

@pytest.mark.parametrize("k,n,alpha", [(8, 10, 0.05), (95, 100, 0.001), (50, 50, 0.01), (1, 20, 0.1)])
def test_clopper_pearson_matches_a_hand_computed_bound(k, n, alpha):
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(hand_clopper_pearson_lower(k, n, alpha), abs=1e-9)


def test_clopper_pearson_edge_cases():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))  # all successes


def test_certify_from_counts_on_a_fixed_sample():
    # item 0: 95/100 votes for class 2 -> certified; item 1: 55/100 -> p_A_lower < 1/2 -> abstain
    counts0 = torch.tensor([[0, 1, 9], [6, 4, 0]])
    counts = torch.tensor([[2, 3, 95], [55, 45, 0]])
    pred, radius = certify_from_counts(counts0, counts, alpha=0.001, sigma=0.5)
    assert pred.tolist() == [2, ABSTAIN]
    expected = 0.5 * norm.ppf(hand_clopper_pearson_lower(95, 100, 0.001))
    assert radius[0].item() == pytest.approx(expected, rel=1e-5)
    assert math.isnan(radius[1].item())


def test_predict_from_counts_uses_the_binomial_test_of_the_top_two():
    counts = torch.tensor([[60, 40, 0], [30, 5, 65], [0, 50, 50]])
    pred = predict_from_counts(counts, alpha=0.05)
    assert binomtest(60, 100, 0.5).pvalue > 0.05 and binomtest(65, 95, 0.5).pvalue < 0.05
    assert pred.tolist() == [ABSTAIN, 2, ABSTAIN]


def test_online_certify_through_the_pipeline_fills_the_radius_and_rejects_abstentions():
    sm = build("smoothing", sigma=0.25, n0=8, n=64, alpha=0.001)

    def classify(x):  # class 0 if mean pixel < 0.5, else class 1; confident items far from 0.5
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1)

    x = torch.stack([torch.full((1, 8, 8), 0.1), torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 0.9)])
    calls = []
    result = DefendedModel([Stage("smooth", sm)], lambda z: calls.append(z.shape[0]) or classify(z))(
        x, torch.Generator().manual_seed(0))
    assert calls == [3 * 72]
    assert result.logits.argmax(1)[[0, 2]].tolist() == [0, 1]
    # every noisy copy of items 0 and 2 votes the same: p_A_lower = alpha^(1/n)
    r_max = 0.25 * norm.ppf(0.001 ** (1 / 64))
    torch.testing.assert_close(result.radius[[0, 2]], torch.tensor([r_max, r_max], dtype=torch.float32))
    # item 1 sits on the boundary: a coin flip per copy -> abstain -> rejected by the stage
    assert result.verdict.tolist() == [0, REJECTED, 0] and result.reason[1] == "smooth"
    assert math.isnan(result.radius[1].item())


def test_smoothing_expand_draws_item_major_gaussian_copies():
    sm = build("smoothing", sigma=0.5, n0=4, n=60)
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    out = sm.expand(x, torch.Generator().manual_seed(1)).view(2, 64, 1, 4, 4)
    assert abs(out[0].mean().item()) < 0.1 and abs(out[1].mean().item() - 1) < 0.1
    assert abs((out - x[:, None]).std().item() - 0.5) < 0.03
    clamped = build("smoothing", sigma=0.5, clamp=True).expand(x, torch.Generator().manual_seed(1))
    assert clamped.min() >= 0 and clamped.max() <= 1


def test_predict_mode_has_no_radius():
    sm = build("smoothing", mode="predict", n=32, sigma=0.1)
    logits = torch.zeros(2 * 32, 3)
    logits[:32, 1] = 1  # item 0: unanimous class 1
    logits[32::2, 0] = 1  # item 1: half class 0 ...
    logits[33::2, 2] = 1  # ... half class 2 -> abstain
    r = sm.aggregate(logits)
    assert r.radius is None and r.abstain.tolist() == [False, True] and r.probs[0].argmax() == 1


def test_offline_certify_and_predict_in_chunks(two_class_data, two_class_model):
    x, y = two_class_data[0][:6], two_class_data[1][:6]
    g = torch.Generator().manual_seed(0)
    pred, radius = certify(two_class_model, x, n0=10, n=200, alpha=0.001, sigma=0.1, batch_size=64, generator=g)
    assert pred.shape == radius.shape == (6,)
    certified = pred != ABSTAIN
    assert certified.sum() >= 4 and (pred[certified] == y[certified]).all()
    assert (radius[certified] > 0).all() and (radius[certified] <= 0.1 * norm.ppf(0.001 ** (1 / 200)) + 1e-6).all()
    acc = certified_accuracy(pred, radius, y, radii=(0.0, 0.25))
    assert acc[0.0] == pytest.approx(float((pred == y).float().mean())) and acc[0.25] == 0.0  # r <= 0.26 here
    p = predict(two_class_model, x, n=100, alpha=0.001, sigma=0.1, batch_size=30, generator=g)
    assert ((p == y) | (p == ABSTAIN)).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"sigma": 0}, "sigma must be a finite number > 0"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"n0": 1.5}, "n0 must be an integer >= 1"),
    ({"alpha": 1.0}, "alpha must lie in"),
    ({"mode": "vote"}, "mode must be 'certify' or 'predict'"),
])
def test_smoothing_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build("smoothing", **kwargs)


@pytest.mark.parametrize("h, w, want", [(28, 28, (2, 2)), (32, 32, (2, 2)), (224, 224, (13, 13)), (10, 100, (1, 6))])
def test_tte_relative_shifts_scale_with_the_image(h, w, want):
    """Issue 21: ``dx=<p>%`` shifts by a share of the side (at least one pixel), so the imagefolder
    preset means the same augmentation at 32x32 and 224x224."""
    from robustgate.defenses.ensemble.tte import parse_transform, shift_image

    t = parse_transform("hflip+dy=6%+dx=6%")
    assert t.pixels(h, w) == want and parse_transform("dx=-6%").pixels(h, w) == (0, -want[1])
    e = build("tte", dataset="imagefolder")
    x = torch.rand(2, 3, h, w)
    copies = e.expand(x).view(2, e.copies, 3, h, w)
    assert torch.equal(copies[:, 0], x) and torch.equal(copies[:, 1], x.flip(-1))
    assert torch.equal(copies[:, 2], shift_image(x, 0, want[1]))
    assert build("tte", transforms=["dx=1", "dx=50%"]).expand(torch.rand(1, 1, 4, 4)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown transform part 'dx=5.5'"):
        build("tte", transforms=["dx=5.5"])
