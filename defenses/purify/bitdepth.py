"""Bit-depth reduction, the first squeezer of Feature Squeezing (Xu, Evans & Qi, NDSS 2018,
"Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks").

Each value -- every pixel of every channel, grayscale or RGB, any size -- is quantized on its
own to ``2**bits`` levels: ``round(x * (2**bits - 1)) / (2**bits - 1)``. On
(Fashion-)MNIST Xu et al. use 1 bit; 4-5 bits keep natural images recognisable.

Known limits: rounding has zero gradient almost everywhere, so a gradient attack sees nothing --
obfuscated gradients. BPDA with the identity (straight-through) breaks it (Athalye, Carlini &
Wagner, ICML 2018), as do attacks aware of the squeezer (He et al. 2017, "Adversarial Example
Defenses: Ensembles of Weak Defenses are not Strong"). Report it only under BPDA.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from robustgate.defenses.base import Purifier, check_images, register


def reduce_bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, C, H, W]`` in ``[0, 1]`` -> the nearest of ``2**bits`` evenly spaced levels."""
    levels = float(2**bits - 1)
    return torch.round(x * levels) / levels


@register
class BitDepthReduction(Purifier):
    """Quantizes pixels to ``bits`` bits (1..8). BPDA surrogate: the identity (straight-through);
    the quantization error is at most ``0.5 / (2**bits - 1)`` per pixel."""

    kind: ClassVar[str] = "bitdepth"
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False

    def __init__(self, bits: int = 4):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bitdepth: bits must be an integer in [1, 8], got {bits!r}")
        self.bits = bits

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="bitdepth")
        return reduce_bit_depth(x, self.bits)

    def bpda(self, x: torch.Tensor) -> torch.Tensor:
        return x
