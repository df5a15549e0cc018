"""JPEG compression as an input purifier (Dziugaite et al. 2016; Das et al. 2017; Guo et al. 2018).

The batch is rounded to 8-bit pixels, encoded and decoded by a real JPEG codec (libjpeg through
Pillow, baseline, no chroma subsampling so that quality 100 is near-identity in RGB too), and
mapped back to ``[0, 1]``. Pillow rather than ``torchvision.io.encode_jpeg``: torchvision 0.29
deprecates its image codecs and fixes 4:2:0 chroma subsampling. Quantizing the
DCT coefficients removes part of a small high-frequency perturbation.

The batch goes through the codec as one mosaic (:func:`mosaic_roundtrip`), not image by image:
baseline JPEG without chroma subsampling codes every 8x8 block on its own (DCT, quantization,
inverse DCT; only the lossless entropy coding links blocks), so an image padded to whole blocks the
way libjpeg pads a partial block (its last row and column repeated) and placed on the block grid of
a larger picture decodes to exactly the pixels it decodes to alone -- a test checks this bit for
bit. One encode and decode of a 256x256 mosaic costs about what two 28x28 images cost one at a time,
most of the per-image cost being Pillow's per-call overhead (bench/results/purify.proxy_cost.md).

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
    return (x.detach() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _codec(img: np.ndarray, mode: str, quality: int) -> np.ndarray:
    """One ``[H, W]`` (L) or ``[H, W, 3]`` (RGB) uint8 image through JPEG encode + decode."""
    buf = io.BytesIO()
    Image.fromarray(img, mode=mode).save(buf, format="JPEG", quality=quality, subsampling=0)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert(mode))


BLOCK = 8  # the JPEG block edge (one MCU without chroma subsampling)
MAX_SIDE = 65_500  # JPEG's largest picture side is 65,535


def mosaic_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """``pixels`` ``[N, H, W, C]`` uint8 (C = 1 or 3) -> the same after one JPEG encode + decode of
    their mosaic; identical to :func:`_codec` on each image (module docstring). The result may be a
    strided view of the decoded mosaic."""
    n, h, w, c = pixels.shape
    ch, cw = -(-h // BLOCK) * BLOCK, -(-w // BLOCK) * BLOCK  # each image's cell: whole blocks
    cols = max(1, min(n, int(np.ceil(np.sqrt(n * ch / cw))), MAX_SIDE // cw))  # about square
    rows = -(-n // cols)
    if rows * ch > MAX_SIDE:  # a batch too large for one picture: in picture-sized slices
        per = (MAX_SIDE // ch) * cols
        return np.concatenate([mosaic_roundtrip(pixels[i:i + per], quality) for i in range(0, n, per)])
    picture = np.zeros((rows * ch, cols * cw, c), dtype=np.uint8)
    cells = picture.reshape(rows, ch, cols, cw, c)  # a view: [row, y, col, x, channel]
    if n < rows * cols:  # the last row's empty cells stay black: no block of theirs touches an image
        pixels = np.concatenate([pixels, np.zeros((rows * cols - n, h, w, c), dtype=np.uint8)])
    cells[:, :h, :, :w] = pixels.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
    cells[:, h:] = cells[:, h - 1:h]  # libjpeg's padding of a partial block: the last row and column repeated
    cells[:, :, :, w:] = cells[:, :, :, w - 1:w]
    decoded = _codec(picture[..., 0] if c == 1 else picture, "L" if c == 1 else "RGB", quality)
    decoded = decoded.reshape(rows, ch, cols, cw, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, ch, cw, c)
    out = decoded[:n, :h, :w]
    return out if out.flags.writeable else out.copy()  # torch.from_numpy wants a writable array


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encodes every image of ``x`` ``[N, C, H, W]`` as JPEG at ``quality`` and decodes it again.

    Returns ``[N, C, H, W]`` of ``x``'s dtype and device, values on the 1/255 grid in ``[0, 1]``."""
    c = x.shape[1]
    if c not in (1, 3):
        raise ValueError(f"jpeg: expected 1 (grayscale) or 3 (RGB) channels, got {c}")
    if x.shape[0] == 0:
        return x.detach().clone()
    pixels = to_uint8(x).cpu().permute(0, 2, 3, 1).numpy()  # [N, H, W, C] uint8; the codec runs on the CPU
    decoded = torch.from_numpy(mosaic_roundtrip(pixels, quality)).permute(0, 3, 1, 2)  # [N, C, H, W] uint8
    return decoded.to(torch.float32).div_(255.0).to(device=x.device, dtype=x.dtype)


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
