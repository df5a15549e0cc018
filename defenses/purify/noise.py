"""Additive Gaussian noise as an input purifier (random noise injection; cf. Zhang & Liang 2019,
"Defending against Whitebox Adversarial Attacks via Randomized Discretization"; the smoothing
view in Cohen et al. 2019).

``purify(x) = clamp(x + sigma * eps, 0, 1)`` with ``eps ~ N(0, I)`` -- independent for every pixel
of every channel, at any ``C x H x W`` -- drawn from the caller's generator, so a seeded generator reproduces the output exactly.

Known limits: the randomness makes single-sample gradients noisy, not absent; Expectation over
Transformation (averaging gradients over many draws; Athalye, Carlini & Wagner, ICML 2018)
removes that effect, so evaluate it only with EOT. Without a backbone trained on the same noise
(the trainer's ``--noise-sigma``), clean accuracy drops quickly with ``sigma``. For a certified
guarantee use the ``smoothing`` ensemble instead: one noisy sample certifies nothing.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from robustgate.defenses.base import Purifier, check_images, register


def add_gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``clamp(x + sigma * N(0, I), 0, 1)``, same shape, dtype and device.

    Differentiable in ``x`` (the gradient is 1 where the clamp is inactive)."""
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # [N, C, H, W]
    return (x + sigma * eps).clamp(0.0, 1.0)


@register
class GaussianNoisePurifier(Purifier):
    """Gaussian noise of standard deviation ``sigma`` (pixel units, ``sigma >= 0``), clamped to
    ``[0, 1]``. Randomized (red team: EOT) and differentiable (no BPDA needed)."""

    kind: ClassVar[str] = "noise"
    randomized: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True

    def __init__(self, sigma: float = 0.1):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"noise: sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="noise")
        return add_gaussian_noise(x, self.sigma, generator)
