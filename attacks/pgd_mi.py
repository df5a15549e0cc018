"""PGD-MI: PGD on the classification loss plus the HSIC estimate of I(x + delta, z).

The adaptive attack of Xu et al., "MIMIR: Masked Image Modeling for Mutual Information-based
Adversarial Robustness" (arXiv 2312.04960; reference code github.com/xiaoyunxxy/MIMIR,
``adaptive_attack/pgd_mi.py``, read, not copied). MIMIR pre-trains the encoder to *lower* the
mutual information between the adversarial input and its latent; an attacker who knows that
raises it while fooling the classifier. For ``x'`` in the l-inf ball of radius eps around ``x``
and the [0, 1] box (projected sign-gradient ascent, Madry et al. 2018, uniform random start):

    L(x') = CE(f(x'), y) + lambda * nHSIC(z(x'), x')                               (batch mean CE)

- ``f`` the classifier's logits, ``CE`` the mean cross-entropy over the batch;
- ``z`` the encoder representation, :func:`robustgate.attacks.feature_pgd.representation`
  (ViT: the class token after the final LayerNorm -- the reference code's ``forward_features``);
- ``nHSIC`` the normalized-CCA HSIC of the flattened ``z`` and ``x'`` with Gaussian kernels of
  width ``sigma`` (``models/hsic.py``; ``estimator="hsic"`` for the biased tr(KHLH)/(n-1)^2);
- defaults as the reference code: ``lam = 1e-5``, ``sigma = 5``, ``nhsic_cca``.

Paper symbols -> code: x -> ``x``; delta -> ``x_adv - x``; epsilon -> ``eps``; alpha -> ``alpha``;
z -> ``z``; lambda -> ``lam``; sigma -> ``sigma``.

Known limits: HSIC is a *batch* statistic -- each item's perturbation depends on the other items
of its batch (``robustgate eval --batch-size``). At the reference lambda (1e-5) the HSIC term is
tiny next to the cross-entropy (nHSIC is at most ~n), so PGD-MI is close to PGD; it is the
paper's attack as published, and ``lam`` is configurable for stronger MI weighting. The last
iterate is returned, as torchattacks' PGD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustgate.attacks.feature_pgd import REPRESENTATIONS, default_representation, representation
from robustgate.models.hsic import ESTIMATORS


def mi_term(x_adv: torch.Tensor, z: torch.Tensor, *, sigma: float | None, estimator: str) -> torch.Tensor:
    """HSIC estimate of I(x', z): ``[N, C, H, W]``, ``[N, D]`` -> scalar (flattened per item)."""
    return ESTIMATORS[estimator](z.flatten(1), x_adv.flatten(1), sigma_x=sigma, sigma_y=sigma)


def pgd_mi_objective(logits: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, z: torch.Tensor, *,
                     lam: float, sigma: float | None, estimator: str) -> torch.Tensor:
    """``CE(logits, y) + lam * HSIC(z, x_adv)``: ``[N, K]``, ``[N]``, ``[N, C, H, W]``, ``[N, D]`` -> scalar."""
    loss = F.cross_entropy(logits, y)
    if lam:
        loss = loss + lam * mi_term(x_adv, z, sigma=sigma, estimator=estimator)
    return loss


class PGDMI:
    """l-inf PGD maximizing ``CE + lam * HSIC(z(x'), x')``.

    Args: module (the backbone: ``forward`` -> logits, and a representation, see
    :mod:`robustgate.attacks.feature_pgd`); eps; steps; alpha (default 2.5 * eps / steps, as
    ``robustgate eval``'s PGD); lam (1e-5); sigma (5.0); estimator (``"nhsic_cca"`` or
    ``"hsic"``); representation (default: ``"encoder"`` for a ViT, else ``"features"``);
    random_start.

    Example::

        x_adv = PGDMI(vit, eps=0.1, steps=20)(x, y)   # x [N, 1, 28, 28] in [0, 1], y [N]
    """

    def __init__(self, module: nn.Module, eps: float, steps: int = 20, alpha: float | None = None,
                 lam: float = 1e-5, sigma: float | None = 5.0, estimator: str = "nhsic_cca",
                 representation: str | None = None, random_start: bool = True):
        if eps < 0 or steps < 1:
            raise ValueError(f"PGDMI: need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"PGDMI: alpha must be > 0, got {alpha}")
        if lam < 0:
            raise ValueError(f"PGDMI: lam must be >= 0, got {lam}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"PGDMI: estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
        kind = representation or default_representation(module)
        if kind not in REPRESENTATIONS:
            raise ValueError(f"PGDMI: representation must be one of {REPRESENTATIONS}, got {kind!r}")
        self.module, self.eps, self.steps, self.random_start = module, eps, steps, random_start
        self.alpha = 2.5 * eps / steps if alpha is None else alpha
        self.lam, self.sigma, self.estimator, self.representation = lam, sigma, estimator, kind

    def params(self) -> dict:
        return {"step_size": self.alpha, "lam": self.lam, "sigma": self.sigma, "estimator": self.estimator,
                "representation": self.representation, "random_start": self.random_start,
                "objective": "CE(f(x'), y) + lam * HSIC(z(x'), x') over the batch", "returns": "last iterate"}

    def objective(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar maximized, at ``x_adv`` (one batch)."""
        logits = self.module(x_adv)  # [N, K]
        z = representation(self.module, x_adv, self.representation) if self.lam else logits  # [N, D]
        return pgd_mi_objective(logits, y, x_adv, z, lam=self.lam, sigma=self.sigma, estimator=self.estimator)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]`` -> ``x_adv`` ``[N, C, H, W]``."""
        was_training = self.module.training
        self.module.eval()
        try:
            x = x.detach()
            # 1. uniform random start in the ball and the box
            x_adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1) if self.random_start else x.clone()
            for _ in range(self.steps):
                # 2. gradient of CE + lam * HSIC, 3. signed ascent, projection onto ball and box
                x_adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.objective(x_adv, y), x_adv)
                x_adv = x_adv.detach() + self.alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
            return x_adv.detach()
        finally:
            self.module.train(was_training)
