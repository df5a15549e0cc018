"""JPEG compression as an input purifier (Dziugaite et al. 2016; Das et al. 2017; Guo et al. 2018).

The batch is rounded to 8-bit pixels, encoded and decoded by a real JPEG codec (libjpeg through
Pillow, baseline), and mapped back to ``[0, 1]``. Pillow rather than ``torchvision.io.encode_jpeg``:
torchvision 0.29 deprecates its image codecs and fixes 4:2:0 chroma subsampling. Quantizing the
DCT coefficients removes part of a small high-frequency perturbation.

Colour: a grayscale image (``C = 1``) is coded as one luma component (Pillow mode ``L``) and stays
grayscale. An RGB image (``C = 3``) is coded the way JPEG codes colour: Pillow hands it to libjpeg
as ``RGB``, which converts it to YCbCr (ITU-R BT.601, full range), quantizes luma with the luma
table and both chroma planes with the coarser chroma table, and converts back on decoding.
``subsampling`` sets the chroma resolution: ``"4:4:4"`` (default: full-resolution chroma, so
quality 100 stays near-identity and the purifier only removes what the quantization removes),
``"4:2:2"`` (half horizontal) or ``"4:2:0"`` (half in both directions: what cameras and Pillow's
own default write; it blurs colour edges and costs some clean accuracy).

Without chroma subsampling the batch goes through the codec as one mosaic (:func:`jpeg_roundtrip`),
not image by image:
baseline JPEG without chroma subsampling codes every 8x8 block on its own (DCT, quantization,
inverse DCT; only the lossless entropy coding links blocks), so an image padded to whole blocks the
way libjpeg pads a partial block (its last row and column repeated) and placed on the block grid of
a larger picture decodes to exactly the pixels it decodes to alone -- a test checks this bit for
bit. One encode and decode of a 256x256 mosaic costs about what two 28x28 images cost one at a time,
most of the per-image cost being Pillow's per-call overhead (bench/results/defenses.md).
With chroma subsampling the mosaic would not be exact: libjpeg's decoder upsamples chroma with a
triangle filter that reads the neighbouring chroma sample, which at an image's edge is the edge
itself but in a mosaic belongs to the next image; so ``4:2:2`` and ``4:2:0`` code RGB images one
at a time (exact, slower). A large batch (3x224x224 images) may be split into parts coded at once
in threads of their own, a mosaic per part (defenses/purify/parts.py; the same pixels).

Known limits: the codec is not differentiable and hides the gradient, which is exactly the
"obfuscated gradients" pattern: BPDA with the identity as the backward pass breaks it (Athalye,
Carlini & Wagner, ICML 2018), and attacks that optimise through a differentiable JPEG
approximation break it too (Shin & Song 2017). Report it only under BPDA. Low quality also costs
clean accuracy, so ``quality`` is a trade-off, not a robustness knob.

Input contract: ``[N, C, H, W]`` float pixels in ``[0, 1]`` with ``C`` = 1 (grayscale) or 3 (RGB),
any height and width up to JPEG's 65,535.
"""

from __future__ import annotations

import io
import os
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from robustgate.defenses.base import Purifier, check_images, register
from robustgate.defenses.purify.parts import run_parts


SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}  # Pillow's codes


def _encode(image: Image.Image, quality: int, subsampling: str) -> io.BytesIO:
    """``image`` as a JPEG file in memory, encoded without holding the GIL where the platform allows:
    Pillow releases it only while encoding to a real file descriptor (``encode_to_file``), not into a
    ``BytesIO``, so the file is written to an anonymous in-memory file (``os.memfd_create``, Linux)
    and read back. Held, the GIL would stall the proxy's event loop and the batch's other parts
    (parts.py) for the whole encode."""
    options = {"format": "JPEG", "quality": quality, "subsampling": SUBSAMPLING[subsampling]}
    if not hasattr(os, "memfd_create"):
        buf = io.BytesIO()
        image.save(buf, **options)
        buf.seek(0)
        return buf
    with os.fdopen(os.memfd_create("robustgate-jpeg"), "w+b") as fh:
        image.save(fh, **options)
        fh.seek(0)
        return io.BytesIO(fh.read())


def _codec(img: np.ndarray, mode: str, quality: int, subsampling: str = "4:4:4") -> np.ndarray:
    """One ``[H, W]`` (L) or ``[H, W, 3]`` (RGB) uint8 image through JPEG encode + decode
    (``subsampling``: a key of ``SUBSAMPLING``; it applies to RGB only).

    Each step is one call into Pillow's C code (``frombuffer`` shares ``img``, ``load`` decodes at
    once, no mode conversion): every call into C releases the GIL, and in the proxy's worker thread
    each release can cost a wait for the event loop (bench/results/defenses.md)."""
    h, w = img.shape[:2]
    buf = _encode(Image.frombuffer(mode, (w, h), np.ascontiguousarray(img), "raw", mode, 0, 1), quality, subsampling)
    with Image.open(buf) as decoded:
        decoded.load()
        if decoded.mode != mode:  # libjpeg decodes a 1-component picture to L, a 3-component one to RGB
            raise RuntimeError(f"jpeg: the codec decoded {mode} as {decoded.mode}")
        return np.asarray(decoded)


BLOCK = 8  # the JPEG block edge (one MCU without chroma subsampling)
MAX_SIDE = 65_500  # JPEG's largest picture side is 65,535


def _one_by_one(src: np.ndarray, out: np.ndarray, quality: int, subsampling: str) -> None:
    """:func:`jpeg_roundtrip` image by image, for RGB with chroma subsampling (module docstring):
    ``src`` ``[n, 3, H, W]`` float pixels -> ``out`` ``[n, 3, H, W]`` float32."""
    pixels = np.empty(src.shape[:1] + src.shape[2:] + src.shape[1:2], dtype=np.uint8)  # [n, H, W, 3]
    np.copyto(pixels, src.transpose(0, 2, 3, 1) * 255.0 + 0.5, casting="unsafe")  # round half up, as below
    for img, o in zip(pixels, out):
        np.divide(_codec(img, "RGB", quality, subsampling).transpose(2, 0, 1), np.float32(255.0), out=o)


def _mosaic(src: np.ndarray, out: np.ndarray, quality: int) -> None:
    """``src`` ``[n, C, H, W]`` float pixels (n >= 1) through the codec as one mosaic picture (in
    picture-sized slices when too large for one) -> ``out`` ``[n, C, H, W]`` float32. Every pixel is
    written once on the way in (scaled, rounded and placed in its cell) and once on the way out, with
    as few calls into numpy as the layout allows -- each releases the GIL."""
    n, c, h, w = src.shape
    ch, cw = -(-h // BLOCK) * BLOCK, -(-w // BLOCK) * BLOCK  # each image's cell: whole blocks
    cols = max(1, min(n, int(np.ceil(np.sqrt(n * ch / cw))), MAX_SIDE // cw))  # about square
    rows = -(-n // cols)
    if rows * ch > MAX_SIDE:  # a batch too large for one picture: in picture-sized slices
        per = (MAX_SIDE // ch) * cols
        for i in range(0, n, per):
            _mosaic(src[i:i + per], out[i:i + per], quality)
        return
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
    images = decoded.reshape(rows, ch, cols, cw, c)[:, :h, :, :w].transpose(0, 2, 4, 1, 3)  # [row, col, C, H, W]
    full = n // cols  # rows of the mosaic whose every cell holds an image
    np.divide(images[:full], np.float32(255.0), out=out[:full * cols].reshape(full, cols, c, h, w))
    if full * cols < n:
        np.divide(images[full, :n - full * cols], np.float32(255.0), out=out[full * cols:])


def jpeg_roundtrip(x: torch.Tensor, quality: int, subsampling: str = "4:4:4") -> torch.Tensor:
    """Encodes every image of ``x`` ``[N, C, H, W]`` (pixels in ``[0, 1]``, C = 1 or 3) as JPEG at
    ``quality`` and decodes it again, as one mosaic picture per part of the batch (parts.py: one part
    unless a large batch runs with purify threads); each image comes back exactly as :func:`_codec`
    returns it alone (module docstring). RGB with ``subsampling`` other than ``"4:4:4"`` goes image
    by image instead.

    Returns ``[N, C, H, W]`` of ``x``'s dtype and device, values on the 1/255 grid in ``[0, 1]``."""
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg: expected 1 (grayscale) or 3 (RGB) channels, got {c}")
    if n == 0:
        return x.detach().clone()
    src = x.detach().cpu()
    src = (src if src.dtype in (torch.float32, torch.float64) else src.float()).numpy()
    out = np.empty((n, c, h, w), dtype=np.float32)
    if c == 3 and subsampling != "4:4:4":
        src32 = src.astype(np.float32, copy=False)  # image by image rounds in float32, as it always has
        run_parts(n, c * h * w, lambda a, b: _one_by_one(src32[a:b], out[a:b], quality, subsampling))
    else:
        run_parts(n, c * h * w, lambda a, b: _mosaic(src[a:b], out[a:b], quality))
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


@register
class JpegPurifier(Purifier):
    """JPEG round trip at ``quality`` (1..100; 100 = finest quantization, near-identity), RGB
    through YCbCr with chroma ``subsampling`` ``"4:4:4"`` (default), ``"4:2:2"`` or ``"4:2:0"``
    (module docstring; grayscale images ignore it).

    BPDA surrogate: the identity (straight-through), the approximation Athalye et al. used; the
    codec's output is close to its input, so ``d purify / d x ~ I``."""

    kind: ClassVar[str] = "jpeg"
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False

    def __init__(self, quality: int = 75, subsampling: str = "4:4:4"):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"jpeg: quality must be an integer in [1, 100], got {quality!r}")
        if subsampling not in SUBSAMPLING:
            raise ValueError(f"jpeg: subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}")
        self.quality, self.subsampling = quality, subsampling

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="jpeg")
        return jpeg_roundtrip(x, self.quality, self.subsampling)

    def bpda(self, x: torch.Tensor) -> torch.Tensor:
        return x
