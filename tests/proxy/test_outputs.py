"""Output policies (proxy/outputs.py): argmax kept by every policy, calibration kept by AAA within a
stated tolerance on the tiny trained model, and ART's Square less successful against a local oracle
that answers AAA logits than against one that answers the raw logits (measured here, same seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustgate.proxy.outputs import (
    aaa, aaa_target_margin, full_logits, label_only, logit_margin, softmax, top_k_probabilities,
)

ECE_TOLERANCE = 0.01  # AAA may move the expected calibration error by at most this much


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of top-1 confidence, ``bins`` equal-width bins."""
    conf, right = p.max(1), p.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    return float(sum(((conf > lo) & (conf <= hi)).mean() * abs(right[(conf > lo) & (conf <= hi)].mean()
                                                               - conf[(conf > lo) & (conf <= hi)].mean())
                     for lo, hi in zip(edges[:-1], edges[1:]) if ((conf > lo) & (conf <= hi)).any()))


@pytest.fixture(scope="module")
def random_logits():
    return np.random.default_rng(0).normal(size=(500, 10)) * 3


@pytest.fixture(scope="module")
def tiny_net(tiny_bundle):
    from robustgate.models.bundle import Bundle
    from robustgate.models.twin import load_backbone

    return load_backbone(Bundle.load(tiny_bundle)).eval()


def test_every_policy_keeps_the_argmax(random_logits):
    z = random_logits
    top = z.argmax(1)
    assert np.array_equal(full_logits(z), z.astype(np.float32))
    assert np.array_equal(label_only(z), top)
    p = top_k_probabilities(z, k=3, decimals=4)
    assert ((p > 0).sum(1) <= 3).all() and np.allclose(p, np.round(p, 4), atol=1e-6)
    sp = np.sort(softmax(z), 1)
    clear = sp[:, -1] - sp[:, -2] > 1e-4  # rounding can tie the top two only when they are closer than that
    assert np.array_equal(p.argmax(1)[clear], top[clear])
    for tau in (0.25, 1.0, 4.0):
        assert np.array_equal(aaa(z, tau=tau).argmax(1), top)
    with pytest.raises(ValueError, match="need k >= 1"):
        top_k_probabilities(z, k=0)
    with pytest.raises(ValueError, match=r"logits must be \[N, K\]"):
        aaa(z[0])
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        aaa(z, alpha=1.0)


def test_aaa_reverses_the_margin_inside_each_interval():
    tau, alpha = 1.0, 0.9
    m = np.linspace(0.01, 2.99, 300)  # three intervals
    t = aaa_target_margin(m, tau, alpha)
    assert (t > 0).all() and (np.floor(t / tau) == np.floor(m / tau)).all()  # same interval, argmax kept
    inside = np.floor(m[1:] / tau) == np.floor(m[:-1] / tau)
    assert (np.diff(t)[inside] < 0).all()  # the reported margin falls where the true one rises
    # the logits carry exactly that margin: a 2-class ramp whose true margin rises
    z = np.stack([m, np.zeros_like(m)], 1)
    assert np.allclose(logit_margin(aaa(z, tau=tau, alpha=alpha)), t, atol=1e-4)


def test_aaa_keeps_calibration_on_the_tiny_model(tiny_net, fmnist_subset):
    x, y = fmnist_subset("test", 1000)
    with torch.no_grad():
        z = tiny_net(x).double().numpy()
    tau = 0.5
    u = aaa(z, tau=tau)
    p, q = softmax(z).max(1), softmax(u).max(1)
    # the top-1 probability is kept exactly wherever it is reachable with the target margin m:
    # e^m / (e^m + K - 1) <= p <= e^m / (e^m + 1)
    m = aaa_target_margin(logit_margin(z), tau, 0.9)
    reachable = (p <= np.exp(m) / (np.exp(m) + 1)) & (p >= np.exp(m) / (np.exp(m) + z.shape[1] - 1))
    print(f"reachable {reachable.mean():.3f}, mean |dp| {np.abs(p - q).mean():.4f}, max {np.abs(p - q).max():.4f}")
    assert reachable.mean() > 0.5
    assert np.abs(p - q)[reachable].max() < 1e-4
    assert np.abs(p - q).mean() < 0.01  # where out of reach, the nearest reachable confidence
    assert abs(ece(softmax(u), y.numpy()) - ece(softmax(z), y.numpy())) <= ECE_TOLERANCE


@pytest.mark.slow
def test_square_succeeds_less_against_aaa(tiny_net, fmnist_subset):
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    x, y = fmnist_subset("test", 64)
    success = {}
    for policy in ("logits", "aaa"):
        def predict(batch: np.ndarray, policy=policy) -> np.ndarray:  # the local oracle: [M, 1, 28, 28] -> [M, 10]
            with torch.no_grad():
                z = tiny_net(torch.from_numpy(batch.astype(np.float32))).numpy()
            return softmax(aaa(z, tau=0.5) if policy == "aaa" else z)  # what an attacker reads as scores

        clf = BlackBoxClassifierNeuralNetwork(predict, (1, 28, 28), 10, channels_first=True, clip_values=(0.0, 1.0))
        np.random.seed(0)  # ART's Square draws from numpy's global generator
        adv = SquareAttack(clf, norm=np.inf, eps=0.1, max_iter=120, p_init=0.3, verbose=False).generate(
            x.numpy(), y=np.eye(10)[y.numpy()])
        assert np.abs(adv - x.numpy()).max() <= 0.1 + 1e-6
        with torch.no_grad():
            success[policy] = float((tiny_net(torch.from_numpy(adv)).argmax(1) != y).float().mean())
    print(f"Square success: raw {success['logits']:.3f}, AAA {success['aaa']:.3f}")
    assert success["logits"] > 0.2  # the attack works on the raw answers...
    assert success["aaa"] < success["logits"]  # ...and less well when the answers are post-processed


def test_a_probability_model_gets_its_own_probabilities_through_the_policies(random_logits):
    """``apply_outputs(..., probabilities=True)`` (a model that ends in a softmax; the pipeline ran on
    the logarithms of its probabilities, models/output_kind.py): ``logits`` answers the model's own
    probabilities again, exact zeros included; top_k the model's own probabilities (a softmax of the
    probabilities themselves would flatten 0.99 to ~0.23 over 10 classes); AAA, as probabilities, what
    the same network with a logits head gets; a rejected item's NaN row stays NaN."""
    from types import SimpleNamespace

    from robustgate.models.output_kind import LOG_FLOOR, to_logits
    from robustgate.proxy.verdicts import apply_outputs

    p = softmax(random_logits[:50]).astype(np.float32)  # [50, 10], what such a model returns
    p[3] = np.eye(10, dtype=np.float32)[4]  # an exact one-hot row (a saturated softmax)
    p[7] = np.nan  # a rejected item (item verdict mode)
    ok = np.ones(len(p), dtype=bool)
    ok[7] = False
    z = to_logits(p)  # what the backend hands the pipeline
    assert np.isfinite(z[ok]).all() and z[3].min() == np.float32(LOG_FLOOR)  # zeros: a finite floor, not -inf
    back = apply_outputs(z, SimpleNamespace(policy="logits"), probabilities=True)
    np.testing.assert_allclose(back[ok], p[ok], rtol=1e-6, atol=0)
    assert (back[3] == p[3]).all()  # the zeros are zeros again
    assert np.isnan(back[7]).all()
    assert apply_outputs(z, SimpleNamespace(policy="logits")) is z  # a logits model: passed through
    top = apply_outputs(z, SimpleNamespace(policy="top_k", k=2, decimals=3), probabilities=True)
    want = top_k_probabilities(random_logits[:50], 2, 3)
    want[3] = 0.0
    want[3, 4] = 1.0  # the one-hot row keeps its 1 and one zero as its runner-up
    np.testing.assert_allclose(top[ok], want[ok], atol=1e-3)
    assert np.isnan(top[7]).all()
    flat = apply_outputs(p, SimpleNamespace(policy="top_k", k=1, decimals=3))  # probabilities read as logits
    assert flat[ok].max(axis=1).max() < 0.25
    # AAA: what the same network with a logits head would answer (AAA's margins and top-1 probability
    # do not move when the logits shift by a constant, and log p = z - logsumexp(z)), as probabilities
    u = apply_outputs(z, SimpleNamespace(policy="aaa", tau=0.5, alpha=0.9, temperature=1.0), probabilities=True)
    same = ok.copy()
    same[3] = False  # the one-hot row has no logits head to compare with
    np.testing.assert_allclose(u[same], softmax(aaa(random_logits[:50][same])), atol=1e-5)
    np.testing.assert_allclose(u[ok].sum(axis=1), 1.0, atol=1e-5)
    assert (u[ok].argmax(axis=1) == p[ok].argmax(axis=1)).all()