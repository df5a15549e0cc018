"""Feature-space PGD: push the encoder's representation of x + delta away from that of x.

The adaptive attack on the *representation* in Xu et al., "MIMIR: Masked Image Modeling for
Mutual Information-based Adversarial Robustness" (arXiv 2312.04960; reference code
github.com/xiaoyunxxy/MIMIR, ``adaptive_attack/pgd_feature.py``, read, not copied). MIMIR shapes
the encoder's latent during pre-training, so an attacker who knows it may ignore the labels and
attack the latent directly. For ``x'`` in the l-inf ball of radius eps around ``x`` and the
[0, 1] box (Madry et al. 2018's projected sign-gradient ascent, uniform random start) maximize

    L(x') = sum_i || z(x'_i) - z(x_i) ||_2                                     (feature distance)

with ``z`` the encoder representation (:func:`representation`). The reference code maximizes the
l2 norm of the whole batch's feature difference, ``sqrt(sum_i ||.||^2)``; its gradient for item
i is a positive multiple of the per-item squared distance's, so the sign steps are the same.

Representation ``z`` [N, D]:

- ``"encoder"`` (ViT, the default for ``vit_tiny``): the class token after the encoder's final
  LayerNorm, ``norm(blocks(embed(x)))[:, 0]`` -- what MAE/MIMIR pre-training trains and the
  reference code's ``forward_features`` returns (the classifier's ``pre_logits``/``head`` come on top);
- ``"features"``: the module's ``features(x)`` (the project's late ReLU features; any backbone).

Known limits: the attack never looks at the label, so it is weaker than PGD on the loss for
models whose decision is robust to feature drift; it is reported to show whether robustness
lives in the representation. The last iterate is returned (as torchattacks' PGD), not the best.
"""

from __future__ import annotations

import torch
from torch import nn

REPRESENTATIONS = ("encoder", "features")


def representation(module: nn.Module, x: torch.Tensor, kind: str = "encoder") -> torch.Tensor:
    """``[N, C, H, W]`` pixels in [0, 1] -> ``[N, D]`` representation ``kind`` of ``module``."""
    if kind == "encoder":
        if not (hasattr(module, "embed") and hasattr(module, "forward_tokens")):
            raise ValueError(f"representation 'encoder' needs a ViT encoder (embed/forward_tokens); "
                             f"{type(module).__name__} has none: use 'features'")
        return module.forward_tokens(module.embed(x))[:, 0]  # [N, 1 + L, dim] -> cls [N, dim]
    if kind == "features":
        return module.features(x)  # [N, D]
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")


def default_representation(module: nn.Module) -> str:
    """``"encoder"`` for a ViT encoder, else ``"features"``."""
    return "encoder" if hasattr(module, "embed") and hasattr(module, "forward_tokens") else "features"


def feature_distance(z_adv: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """``[N, D]``, ``[N, D]`` -> ``[N]`` l2 distances (differentiable at 0: a tiny floor inside the root)."""
    return ((z_adv - z_clean).pow(2).sum(1) + 1e-12).sqrt()


class FeaturePGD:
    """l-inf PGD maximizing the distance between ``z(x + delta)`` and ``z(x)``.

    Args: module (the backbone, eval mode, pixels in [0, 1]); eps (l-inf radius); steps; alpha
    (step size, default 2.5 * eps / steps as ``robustgate eval``'s PGD); representation
    (``"encoder"`` or ``"features"``, default: :func:`default_representation`); random_start.

    Example::

        x_adv = FeaturePGD(vit, eps=0.1, steps=20)(x, y)   # x [N, 1, 28, 28] in [0, 1]
    """

    def __init__(self, module: nn.Module, eps: float, steps: int = 20, alpha: float | None = None,
                 representation: str | None = None, random_start: bool = True):
        if eps < 0 or steps < 1:
            raise ValueError(f"FeaturePGD: need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"FeaturePGD: alpha must be > 0, got {alpha}")
        kind = representation or default_representation(module)
        if kind not in REPRESENTATIONS:
            raise ValueError(f"FeaturePGD: representation must be one of {REPRESENTATIONS}, got {kind!r}")
        self.module, self.eps, self.steps, self.random_start = module, eps, steps, random_start
        self.alpha = 2.5 * eps / steps if alpha is None else alpha
        self.representation = kind

    def params(self) -> dict:
        return {"step_size": self.alpha, "representation": self.representation, "random_start": self.random_start,
                "objective": "sum_i ||z(x_i + delta_i) - z(x_i)||_2", "returns": "last iterate"}

    def objective(self, x_adv: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
        """``[N]`` feature distances of ``x_adv`` from the clean representations ``z_clean``."""
        return feature_distance(representation(self.module, x_adv, self.representation), z_clean)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[N, C, H, W]`` in [0, 1] (``y`` unused) -> ``x_adv`` ``[N, C, H, W]``."""
        was_training = self.module.training
        self.module.eval()
        try:
            x = x.detach()
            with torch.no_grad():
                z_clean = representation(self.module, x, self.representation)  # [N, D]
            # 1. uniform random start in the ball (a zero start has a zero gradient: z(x) = z_clean)
            x_adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1) if self.random_start else x.clone()
            for _ in range(self.steps):
                # 2. gradient of the summed feature distance, 3. signed ascent, projection to ball and box
                x_adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.objective(x_adv, z_clean).sum(), x_adv)
                x_adv = x_adv.detach() + self.alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
            return x_adv.detach()
        finally:
            self.module.train(was_training)
