"""UINT8 levels (0..255) <-> pixels in a bundle's ``input.value_range``: one mapping for the three
places that cross it.

- The proxy's codec reads a UINT8 request (what camera pipelines and Triton clients of a UINT8
  model send) as pixels: level ``k`` is ``lo + k * (hi - lo) / 255``, so 0 and 255 are the range's
  ends whatever the range ([0, 1]: ``k / 255``, the dataset loaders' floats; [0, 255]: ``k``;
  [-1, 1]: TensorFlow's Inception preprocessing).
- A model that takes UINT8 itself (``robustgate import`` of a graph with a UINT8 input) gets the
  inverse in front of its graph (models/graph_edit.py ``uint8_front``): pixels are mapped onto the
  256 levels and rounded, half up.
- An upstream model server whose ModelMetadata declares a UINT8 input gets its batches as levels
  (proxy/backends/upstream.py), rounded the same way.

Pure functions on numpy arrays.
"""

from __future__ import annotations

import numpy as np

TOP = 255  # the largest UINT8 level


def scale(value_range: tuple[float, float]) -> float:
    """Levels per unit of pixel: ``255 / (hi - lo)``."""
    lo, hi = value_range
    return TOP / (hi - lo)


def pixels(levels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """UINT8 ``levels`` -> float32 pixels ``lo + k * (hi - lo) / 255`` (a new C-contiguous array, also
    from a strided view). For [0, 1] this is ``k / 255`` computed as a division, bit-identical to the
    dataset loaders' floats."""
    lo, hi = value_range
    x = levels.astype(np.float32, order="C")
    if (lo, hi) == (0.0, 1.0):
        return np.divide(x, np.float32(TOP), out=x)
    np.multiply(x, np.float32((hi - lo) / TOP), out=x)
    return np.add(x, np.float32(lo), out=x)


def levels(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Pixels ``x`` -> uint8 levels ``floor((x - lo) * 255 / (hi - lo) + 0.5)``, clipped to 0..255
    (a new array): the inverse of :func:`pixels` on its values, and what ``uint8_front`` computes."""
    lo, _ = value_range
    v = np.subtract(x, np.float32(lo), dtype=np.float32)
    np.multiply(v, np.float32(scale(value_range)), out=v)
    np.clip(v, 0.0, TOP, out=v)
    v += np.float32(0.5)
    return np.floor(v, out=v).astype(np.uint8)


def on_levels(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Pixels ``x`` -> the nearest pixels a UINT8 level stands for (float32): what a UINT8 model sees
    of ``x``."""
    return pixels(levels(x, value_range), value_range)


def on_levels_tensor(x, value_range: tuple[float, float]):
    """:func:`on_levels` of a torch tensor, on its device (no gradient: rounding has none; the torch
    twin passes it straight through instead, models/graph_edit.py ``straight_through``)."""
    import torch

    lo, _ = value_range
    s = scale(value_range)
    return torch.floor(((x - lo) * s).clamp(0, TOP) + 0.5) / s + lo
