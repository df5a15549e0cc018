"""JPEG compression as an input purifier (Dziugaite et al. 2016; Das et al. 2017; Guo et al. 2018).

The batch is rounded to 8-bit pixels, encoded and decoded by a real JPEG codec (libjpeg through
Pillow, baseline, no chroma subsampling so that quality 100 is near-identity in RGB too), and
mapped back to ``[0, 1]``. Pillow rather than ``torchvision.io.encode_jpeg``: torchvision 0.29
deprecates its image codecs and fixes 4:2:0 chroma subsampling. Quantizing the
DCT coefficients removes part of a small high-frequency perturbation.

The batch goes through the codec as one mosaic (:func:`jpeg_roundtrip`), not image by image:
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


def _codec(img: np.ndarray, mode: str, quality: int) -> np.ndarray:
    """One ``[H, W]`` (L) or ``[H, W, 3]`` (RGB) uint8 image through JPEG encode + decode.

    Each step is one call into Pillow's C code (``frombuffer`` shares ``img``, ``load`` decodes at
    once, no mode conversion): every call into C releases the GIL, and in the proxy's worker thread
    each release can cost a wait for the event loop (bench/results/defenses.md)."""
    h, w = img.shape[:2]
    buf = io.BytesIO()
    Image.frombuffer(mode, (w, h), np.ascontiguousarray(img), "raw", mode, 0, 1).save(
        buf, format="JPEG", quality=quality, subsampling=0)
    buf.seek(0)
    with Image.open(buf) as decoded:
        decoded.load()
        if decoded.mode != mode:  # libjpeg decodes a 1-component picture to L, a 3-component one to RGB
            raise RuntimeError(f"jpeg: the codec decoded {mode} as {decoded.mode}")
        return np.asarray(decoded)


BLOCK = 8  # the JPEG block edge (one MCU without chroma subsampling)
MAX_SIDE = 65_500  # JPEG's largest picture side is 65,535


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encodes every image of ``x`` ``[N, C, H, W]`` (pixels in ``[0, 1]``, C = 1 or 3) as JPEG at
    ``quality`` and decodes it again, all of them as one mosaic picture; each image comes back
    exactly as :func:`_codec` returns it alone (module docstring).

    Returns ``[N, C, H, W]`` of ``x``'s dtype and device, values on the 1/255 grid in ``[0, 1]``.
    Every pixel is written once on the way in (scaled, rounded and placed in its cell) and once on
    the way out, with as few calls into numpy as the layout allows -- each releases the GIL."""
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg: expected 1 (grayscale) or 3 (RGB) channels, got {c}")
    if n == 0:
        return x.detach().clone()
    ch, cw = -(-h // BLOCK) * BLOCK, -(-w // BLOCK) * BLOCK  # each image's cell: whole blocks
    cols = max(1, min(n, int(np.ceil(np.sqrt(n * ch / cw))), MAX_SIDE // cw))  # about square
    rows = -(-n // cols)
    if rows * ch > MAX_SIDE:  # a batch too large for one picture: in picture-sized slices
        per = (MAX_SIDE // ch) * cols
        return torch.cat([jpeg_roundtrip(x[i:i + per], quality) for i in range(0, n, per)])
    src = x.detach().cpu()
    src = (src if src.dtype in (torch.float32, torch.float64) else src.float()).numpy()
    if n < rows * cols:  # the last row's empty cells stay black: no block of theirs touches an image
        src = np.concatenate([src, np.zeros((rows * cols - n, c, h, w), dtype=src.dtype)])
    scaled = np.multiply(src.reshape(rows, cols, c, h, w).transpose(0, 3, 1, 4, 2), 255.0)  # [row, y, col, x, ch]
    scaled += 0.5
    picture = np.empty((rows * ch, cols * cw, c), dtype=np.uint8)
    cells = picture.reshape(rows, ch, cols, cw, c)  # a view: [row, y, col, x, channel]
    # x + 0.5 truncated = round half up (x >= 0: check_images ran); torch.round would tie to even,
    # which only differs on exact halves, never hit by inputs on the 1/255 grid
    np.copyto(cells[:, :h, :, :w], scaled, casting="unsafe")
    cells[:, h:] = cells[:, h - 1:h]  # libjpeg's padding of a partial block: the last row and column repeated
    cells[:, :, :, w:] = cells[:, :, :, w - 1:w]
    decoded = _codec(picture[..., 0] if c == 1 else picture, "L" if c == 1 else "RGB", quality)
    out = np.empty((rows * cols, c, h, w), dtype=np.float32)
    np.divide(decoded.reshape(rows, ch, cols, cw, c)[:, :h, :, :w].transpose(0, 2, 4, 1, 3), np.float32(255.0),
              out=out.reshape(rows, cols, c, h, w))
    return torch.from_numpy(out[:n]).to(device=x.device, dtype=x.dtype)


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
