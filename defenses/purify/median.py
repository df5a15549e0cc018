"""Median filtering, the second squeezer of Feature Squeezing (Xu, Evans & Qi, NDSS 2018,
"Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks").

Each pixel becomes the median of its ``k x k`` neighbourhood (per channel), with reflect padding
at the borders, so the output keeps the input's shape. A median filter removes sparse, salt-and-
pepper-like perturbations (L0 attacks such as JSMA, CW-L0) well and dense L-inf ones poorly.

Known limits: the median is piecewise linear in its input, so gradients exist (each output
pixel routes its gradient to the selected neighbour) and plain white-box PGD through the filter
already adapts to it; Xu et al. report that adaptive attacks defeat squeezing (He et al. 2017;
Athalye, Carlini & Wagner, ICML 2018). It also blurs fine texture, costing clean accuracy.

Written in pure torch (min/max on sorted columns for 3x3, ``unfold`` + ``sort`` otherwise) because
torchvision has no median filter; the same code runs in the proxy and, differentiably, in the red
team's twin.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from robustgate.defenses.base import Purifier, check_images, register


def _med3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Element-wise median of three: 4 min/max operations."""
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _median3x3(padded: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """3x3 median of ``padded`` ``[N, C, h+2, w+2]`` -> ``[N, C, h, w]`` by sorted columns: sort
    every vertical triple once (lo <= mid <= hi; each column serves three windows), then a window's
    median is the median of (the largest of its three lo, the median of its three mid, the smallest
    of its three hi) -- 18 min/max operations on whole planes, ~1.6x faster than Paeth's 19-exchange
    network (itself ~9x faster than ``Tensor.median`` over unfolded patches) on the CPU, the same values
    (tests/defenses compare with scipy), and differentiable the same way (each output routes its
    gradient to the selected neighbour)."""
    top, centre, bottom = padded[..., 0:h, :], padded[..., 1:h + 1, :], padded[..., 2:h + 2, :]  # [N, C, h, w+2]
    lo1, hi1 = torch.minimum(top, centre), torch.maximum(top, centre)
    lo, hi = torch.minimum(lo1, bottom), torch.maximum(hi1, bottom)
    mid = torch.minimum(hi1, torch.maximum(lo1, bottom))
    left, middle, right = slice(0, w), slice(1, w + 1), slice(2, w + 2)
    max_lo = torch.maximum(torch.maximum(lo[..., left], lo[..., middle]), lo[..., right])
    min_hi = torch.minimum(torch.minimum(hi[..., left], hi[..., middle]), hi[..., right])
    return _med3(max_lo, _med3(mid[..., left], mid[..., middle], mid[..., right]), min_hi)


def median_filter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H, W]``: per-channel ``k x k`` median, reflect padding."""
    if kernel_size == 1:
        return x.clone()
    p = kernel_size // 2
    padded = F.pad(x, (p, p, p, p), mode="reflect")  # [N, C, H+2p, W+2p]
    if kernel_size == 3:
        return _median3x3(padded, *x.shape[-2:])
    patches = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # [N, C, H, W, k, k]
    patches = patches.reshape(*x.shape, kernel_size * kernel_size)  # [N, C, H, W, k*k]
    # k*k is odd: the exact middle element (sort is ~1.4x faster than median here, same values)
    return patches.sort(dim=-1).values[..., kernel_size * kernel_size // 2]


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
