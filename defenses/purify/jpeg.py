"""JPEG compression as an input purifier (Dziugaite et al. 2016; Das et al. 2017; Guo et al. 2018).

The batch is rounded to 8-bit pixels, encoded and decoded by a real JPEG codec (libjpeg through
Pillow, baseline, no chroma subsampling so that quality 100 is near-identity in RGB too), and
mapped back to ``[0, 1]``. Pillow rather than ``torchvision.io.encode_jpeg``: torchvision 0.29
deprecates its image codecs and fixes 4:2:0 chroma subsampling. Quantizing the
DCT coefficients removes part of a small high-frequency perturbation.

Known limits: the codec is not differentiable and hides the gradient, which is exactly the
"obfuscated gradients" pattern: BPDA with the identity as the backward pass breaks it (Athalye,
Carlini & Wagner, ICML 2018), and attacks that optimise through a differentiable JPEG
approximation break it too (Shin & Song 2017). Report it only under BPDA. Low quality also costs
clean accuracy, so ``quality`` is a trade-off, not a robustness knob.

Input contract: ``[N, C, H, W]`` float pixels in ``[0, 1]`` with ``C`` = 1 (grayscale) or 3 (RGB).
"""

from __future__ import annotations

import io
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from robustgate.defenses.base import Purifier, check_images, register


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` floats in ``[0, 1]`` -> uint8 ``[N, C, H, W]`` (round to nearest level)."""
    return (x.detach() * 255.0).round().clamp(0, 255).to(torch.uint8)


def _codec(img: np.ndarray, mode: str, quality: int) -> np.ndarray:
    """One ``[H, W]`` (L) or ``[H, W, 3]`` (RGB) uint8 image through JPEG encode + decode."""
    buf = io.BytesIO()
    Image.fromarray(img, mode=mode).save(buf, format="JPEG", quality=quality, subsampling=0)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert(mode))


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encodes every image of ``x`` ``[N, C, H, W]`` as JPEG at ``quality`` and decodes it again.

    Returns ``[N, C, H, W]`` of ``x``'s dtype and device, values on the 1/255 grid in ``[0, 1]``."""
    c = x.shape[1]
    if c not in (1, 3):
        raise ValueError(f"jpeg: expected 1 (grayscale) or 3 (RGB) channels, got {c}")
    if x.shape[0] == 0:
        return x.detach().clone()
    pixels = to_uint8(x).cpu().permute(0, 2, 3, 1).numpy()  # [N, H, W, C] uint8; the codec runs on the CPU
    mode = "L" if c == 1 else "RGB"
    decoded = np.stack([_codec(img[..., 0] if c == 1 else img, mode, quality) for img in pixels])  # [N, H, W(, C)]
    decoded = torch.from_numpy(decoded).reshape(pixels.shape).permute(0, 3, 1, 2)  # [N, C, H, W] uint8
    return (decoded.to(torch.float32) / 255.0).to(device=x.device, dtype=x.dtype)


@register
class JpegPurifier(Purifier):
    """JPEG round trip at ``quality`` (1..100; 100 = finest quantization, near-identity).

    BPDA surrogate: the identity (straight-through), the approximation Athalye et al. used; the
    codec's output is close to its input, so ``d purify / d x ~ I``."""

    kind: ClassVar[str] = "jpeg"
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False

    def __init__(self, quality: int = 75):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"jpeg: quality must be an integer in [1, 100], got {quality!r}")
        self.quality = quality

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="jpeg")
        return jpeg_roundtrip(x, self.quality)

    def bpda(self, x: torch.Tensor) -> torch.Tensor:
        return x
