"""HSIC, the Hilbert-Schmidt Independence Criterion, as a differentiable mutual-information proxy.

Gretton et al. 2005, "Measuring Statistical Dependence with Hilbert-Schmidt Norms": with
Gaussian kernel matrices K (on x) and L (on y) over n paired samples and the centering matrix
H = I - 11^T / n, the biased empirical estimator is

    HSIC(x, y) = tr(K H L H) / (n - 1)^2                                   (Gretton et al., Eq. 4)

It is >= 0, symmetric, and (for characteristic kernels such as the Gaussian) its population
value is 0 iff x and y are independent. The HSIC bottleneck (Ma et al. 2020) and MIMIR (Xu et al.)
use it in place of the mutual information I(x, z), which is intractable for deep features.

Kernel width convention (as in the HSIC-bottleneck / MIMIR reference code): the Gaussian kernel
is ``exp(-||a - b||^2 / (2 sigma^2 d))`` with ``d`` the flattened feature dimension
(``scale_by_dim=True``), so one ``sigma`` (default 5, MIMIR's) suits inputs of any size;
``sigma=None`` uses the median heuristic (median pairwise distance) instead.

Also provided: ``hsic_normalized_cca``, the normalized variant the MIMIR reference code actually
calls, ``sum(Rx * Ry^T)`` with ``R = Kc (Kc + eps n I)^-1`` and ``Kc = K H`` (Fukumizu et al. 2008,
"Kernel measures of conditional dependence"). It lies in [0, n] roughly and is much larger than
the biased HSIC, which is why MIMIR's lambda (1e-5) is paired with it.

Known limits: with eps = 1e-5 (the reference's) and batches of ~128, the normalized-CCA value is
nearly the same for dependent and for independent (permuted) pairs -- ``R`` is close to a
projection and the sum counts shared dimensions (``bench/training/mimir_compare.py mi-check``,
docs/MIMIR.md); the biased ``hsic`` does separate them. HSIC is an estimate of dependence, not of
mutual information in nats; the biased
estimator has an O(1/n) positive bias (independent samples give small positive values); with
small batches and high-dimensional inputs the Gaussian kernel saturates unless sigma is tuned.
"""

from __future__ import annotations

import torch


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [n, n] squared Euclidean distances (clamped at 0 against round-off)."""
    sq = (x * x).sum(dim=1, keepdim=True)  # [n, 1]
    return (sq - 2.0 * x @ x.T + sq.T).clamp_min(0.0)


def median_sigma(x: torch.Tensor) -> torch.Tensor:
    """Median heuristic: the median off-diagonal pairwise distance of [n, d] ``x`` (no grad)."""
    with torch.no_grad():
        n = x.shape[0]
        d = pairwise_sq_dists(x).sqrt()
        off = d[~torch.eye(n, dtype=torch.bool, device=x.device)]
        return off.median().clamp_min(1e-2)


def gaussian_kernel(x: torch.Tensor, sigma: float | None = 5.0, *, scale_by_dim: bool = True) -> torch.Tensor:
    """Gaussian kernel matrix of [n, ...] samples (flattened) -> [n, n].

    ``sigma`` given: ``exp(-D / (2 sigma^2 d))`` (``d`` = feature dim if ``scale_by_dim`` else 1).
    ``sigma=None``: ``exp(-D / (2 s^2))`` with ``s`` the median pairwise distance.
    """
    x = x.reshape(x.shape[0], -1)  # [n, d]
    dists = pairwise_sq_dists(x)  # [n, n]
    if sigma is None:
        return torch.exp(-dists / (2.0 * median_sigma(x) ** 2))
    if sigma <= 0:
        raise ValueError(f"sigma must be positive or None (median heuristic), got {sigma}")
    width = 2.0 * sigma * sigma * (x.shape[1] if scale_by_dim else 1)
    return torch.exp(-dists / width)


def center(k: torch.Tensor) -> torch.Tensor:
    """H K H for H = I - 11^T/n, without forming H: subtract row and column means, add the mean."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> int:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"HSIC needs at least 2 samples, got {n}")
    return n


def hsic(
    x: torch.Tensor, y: torch.Tensor, *, sigma_x: float | None = 5.0, sigma_y: float | None = 5.0,
    scale_by_dim: bool = True,
) -> torch.Tensor:
    """Biased HSIC estimate tr(K H L H) / (n-1)^2 of [n, ...] ``x`` and [n, ...] ``y`` -> scalar."""
    n = _check_pair(x, y)
    k = gaussian_kernel(x, sigma_x, scale_by_dim=scale_by_dim)  # [n, n]
    l = gaussian_kernel(y, sigma_y, scale_by_dim=scale_by_dim)  # [n, n]
    # tr(K H L H) = sum((H K H) * (H L H)) since H is idempotent and symmetric; centering both
    # makes the sum symmetric in (x, y) in floating point and avoids cancellation.
    return (center(k) * center(l)).sum() / (n - 1) ** 2


def hsic_normalized_cca(
    x: torch.Tensor, y: torch.Tensor, *, sigma_x: float | None = 5.0, sigma_y: float | None = 5.0,
    scale_by_dim: bool = True, eps: float = 1e-5,
) -> torch.Tensor:
    """Normalized (kernel-CCA) HSIC ``sum(Rx * Ry^T)``, ``R = K H (K H + eps n I)^-1`` -> scalar."""
    n = _check_pair(x, y)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)

    def resolvent(k: torch.Tensor) -> torch.Tensor:
        kc = k - k.mean(dim=1, keepdim=True)  # K H: centre columns of each row
        # R = Kc (Kc + eps n I)^-1, solved rather than inverted: R^T = solve((Kc + eps n I)^T, Kc^T).
        return torch.linalg.solve((kc + eps * n * eye).T, kc.T).T

    rx = resolvent(gaussian_kernel(x, sigma_x, scale_by_dim=scale_by_dim))
    ry = resolvent(gaussian_kernel(y, sigma_y, scale_by_dim=scale_by_dim))
    return (rx * ry.T).sum()


ESTIMATORS = {"hsic": hsic, "nhsic_cca": hsic_normalized_cca}
