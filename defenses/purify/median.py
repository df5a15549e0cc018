"""Median filtering, the second squeezer of Feature Squeezing (Xu, Evans & Qi, NDSS 2018,
"Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks").

Each pixel becomes the median of its ``k x k`` neighbourhood (per channel), with reflect padding
at the borders, so the output keeps the input's shape. A median filter removes sparse, salt-and-
pepper-like perturbations (L0 attacks such as JSMA, CW-L0) well and dense L-inf ones poorly.

Known limits: the median is piecewise linear in its input, so gradients exist (each output
pixel routes its gradient to the selected neighbour) and plain white-box PGD through the filter
already adapts to it; Xu et al. report that adaptive attacks defeat squeezing (He et al. 2017;
Athalye, Carlini & Wagner, ICML 2018). It also blurs fine texture, costing clean accuracy.

Written in pure torch (``unfold`` + ``median``) because torchvision has no median filter; the
same code runs in the proxy and, differentiably, in the red team's twin.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from robustgate.defenses.base import Purifier, check_images, register


def median_filter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H, W]``: per-channel ``k x k`` median, reflect padding."""
    if kernel_size == 1:
        return x.clone()
    p = kernel_size // 2
    padded = F.pad(x, (p, p, p, p), mode="reflect")  # [N, C, H+2p, W+2p]
    patches = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # [N, C, H, W, k, k]
    patches = patches.reshape(*x.shape, kernel_size * kernel_size)  # [N, C, H, W, k*k]
    return patches.median(dim=-1).values  # k*k is odd: the exact middle element


@register
class MedianFilter(Purifier):
    """``kernel_size x kernel_size`` median filter (odd, >= 1; 1 = identity). Differentiable
    almost everywhere, so the red team attacks through it; ``bpda`` stays the identity."""

    kind: ClassVar[str] = "median"
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True

    def __init__(self, kernel_size: int = 3):
        if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
                or kernel_size % 2 == 0):
            raise ValueError(f"median: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        self.kernel_size = kernel_size

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="median")
        p = self.kernel_size // 2
        if p >= min(x.shape[-2:]):
            raise ValueError(
                f"median: kernel_size {self.kernel_size} needs images larger than {p} pixels per side "
                f"for reflect padding, got {tuple(x.shape[-2:])}"
            )
        return median_filter(x, self.kernel_size)
