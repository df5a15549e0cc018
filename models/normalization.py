"""Clients that send normalized tensors: ``(pixels - mean) / std`` per channel, as many torchvision
deployments do before the request.

robustgate's defenses work on pixels in the bundle's ``input.value_range`` (a JPEG round trip, a
median filter, MagNet's autoencoder, the attacks' l-inf ball): a normalized tensor is not an image.
A bundle with ``input.normalized: true`` (``robustgate import --mean ... --std ...``) therefore keeps
the user's clients as they are and converts at the two edges:

- the proxy's codec turns each request back into pixels (:meth:`Normalization.pixels`) and checks
  their range, within float rounding (:data:`ROUNDING`: a boundary pixel that the client normalized,
  often in float64, and the proxy turned back in float32 can land a few ulps outside the range; such
  values are clipped to it, anything further is refused as any out-of-range request is);
- ``backbone.onnx`` takes pixels: the import puts the normalization in front of the user's graph
  (models/importer.py), so the twin, ``fit`` and the red team see pixels too;
- an upstream model server gets normalized values again (:meth:`Normalization.normalized`), and so
  does the proxy from robustgate's own clients (the red team's and probe's oracle).

UINT8 requests are pixels by nature (levels 0..255 spanning the value range, models/levels.py) and
are not de-normalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDING = 1e-5  # of the value range: how far outside it a turned-back pixel may land and be clipped


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` (``std > 0``), in the units of the pixels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel each, got {self.mean} and {self.std}")
        if not all(np.isfinite(self.mean)) or not all(s > 0 and np.isfinite(s) for s in self.std):
            raise ValueError(f"mean must be finite and std positive and finite, got {self.mean} and {self.std}")

    @classmethod
    def of(cls, spec) -> "Normalization | None":
        """The bundle's ``input`` (models/bundle.py InputSpec) -> its normalization, None when its
        clients send pixels."""
        return cls(tuple(spec.mean), tuple(spec.std)) if spec.normalized else None

    def _shaped(self, values: tuple[float, ...], ndim: int, channel_axis: int) -> np.ndarray:
        shape = [1] * ndim
        shape[channel_axis] = len(values)
        return np.asarray(values, dtype=np.float32).reshape(shape)

    def pixels(self, x: np.ndarray, channel_axis: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """Normalized values ``x`` -> pixels ``x * std + mean`` along ``channel_axis`` (float32;
        ``out=x`` works in place)."""
        out = np.multiply(x, self._shaped(self.std, x.ndim, channel_axis), out=out, dtype=np.float32)
        return np.add(out, self._shaped(self.mean, x.ndim, channel_axis), out=out)

    def normalized(self, x: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """Pixels ``x`` -> ``(x - mean) / std`` along ``channel_axis``, a new float32 array."""
        out = np.subtract(x, self._shaped(self.mean, x.ndim, channel_axis), dtype=np.float32)
        return np.divide(out, self._shaped(self.std, x.ndim, channel_axis), out=out)
