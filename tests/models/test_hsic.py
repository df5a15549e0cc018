"""HSIC (models/hsic.py): independence near zero, dependence high, symmetric, non-negative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustgate.models.hsic import center, gaussian_kernel, hsic, hsic_normalized_cca


def _naive_hsic(x: np.ndarray, y: np.ndarray, sx: float, sy: float) -> float:
    """tr(K H L H) / (n-1)^2 with explicit matrices, kernel exp(-d^2 / (2 s^2 dim))."""
    n = len(x)

    def k(a, s):
        d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / (2 * s * s * a.shape[1]))

    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k(x, sx) @ h @ k(y, sy) @ h) / (n - 1) ** 2)


def test_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = y + x.sum(1, keepdim=True)
    got = hsic(x, y, sigma_x=0.7, sigma_y=1.3).item()
    assert got == pytest.approx(_naive_hsic(x.numpy(), y.numpy(), 0.7, 1.3), rel=1e-9)


def test_center_is_hkh():
    k = torch.rand(6, 6, dtype=torch.float64)
    h = torch.eye(6, dtype=torch.float64) - 1 / 6
    torch.testing.assert_close(center(k), h @ k @ h)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_independent_near_zero_dependent_high(sigma):
    g = torch.Generator().manual_seed(1)
    n = 256
    x = torch.rand(n, 8, generator=g)
    independent = torch.rand(n, 8, generator=g)
    dependent = torch.exp(2 * x) + 0.1 * torch.rand(n, 8, generator=g)  # nonlinear, strong
    h_ind = hsic(x, independent, sigma_x=sigma, sigma_y=sigma).item()
    h_same = hsic(x, x, sigma_x=sigma, sigma_y=sigma).item()
    h_dep = hsic(x, dependent, sigma_x=sigma, sigma_y=sigma).item()
    assert 0 <= h_ind < 0.05 * h_same
    assert h_dep > 5 * h_ind
    # the biased estimator's value for independent data shrinks with n
    h_ind_small = hsic(x[:32], independent[:32], sigma_x=sigma, sigma_y=sigma).item()
    assert h_ind < h_ind_small


def test_symmetric_and_non_negative_on_images():
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        a = torch.rand(16, 1, 28, 28, generator=g)
        b = torch.rand(16, 3, 7, generator=g) + a.flatten(1)[:, :1, None]
        for fn in (hsic, hsic_normalized_cca):
            ab, ba = fn(a, b).item(), fn(b, a).item()
            assert ab >= 0 and ab == pytest.approx(ba, rel=1e-4, abs=1e-9)


def test_normalized_cca_separates_dependence_at_the_default_width():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 4, generator=g)
    y = torch.rand(64, 4, generator=g)
    ind = hsic_normalized_cca(x, y).item()
    assert ind >= 0
    assert hsic_normalized_cca(x, x).item() > 5 * ind
    assert hsic_normalized_cca(x, torch.exp(2 * x)).item() > 5 * ind


def test_differentiable():
    x = torch.rand(10, 5, requires_grad=True)
    z = torch.rand(10, 3)
    hsic(x, z @ torch.ones(3, 5) + x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same number of samples"):
        hsic(torch.rand(4, 2), torch.rand(5, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        hsic(torch.rand(1, 2), torch.rand(1, 2))
    with pytest.raises(ValueError, match="sigma must be positive"):
        gaussian_kernel(torch.rand(4, 2), sigma=0.0)
