"""What a model's clients send, when it is not the pixels robustgate works on: values normalized
per channel, ``(pixels - mean) / std`` (many torchvision deployments normalize before the request),
and the channels in BGR order (models trained on OpenCV's ``imread``, Caffe's heritage).

robustgate's defenses work on RGB pixels in the bundle's ``input.value_range`` (a JPEG round trip
converts RGB to YCbCr, a median filter, MagNet's autoencoder fitted on RGB data sets, the attacks'
l-inf ball): a normalized tensor is not an image, and a BGR one is an image with its colours
swapped. A bundle with ``input.normalized: true`` (``robustgate import --mean ... --std ...``) or
``input.channel_order: BGR`` (``--channel-order BGR``) therefore keeps the user's clients as they
are and converts at the two edges:

- the proxy's codec turns each request back into RGB pixels (:meth:`ClientValues.pixels`) and
  checks their range, within float rounding (:data:`ROUNDING`: a boundary pixel that the client
  normalized, often in float64, and the proxy turned back in float32 can land a few ulps outside
  the range; such values are clipped to it, anything further is refused as any out-of-range
  request is);
- ``backbone.onnx`` takes RGB pixels: the import puts the normalization and the channel reversal in
  front of the user's graph (models/importer.py), so the twin, ``fit`` and the red team see pixels
  too;
- an upstream model server gets the clients' values again (:meth:`ClientValues.values`), and so
  does the proxy from robustgate's own clients (the red team's and probe's oracle).

``mean`` and ``std`` are in the model's (the clients') channel order. UINT8 requests are pixels by
nature (levels 0..255 spanning the value range, models/levels.py) and are not de-normalized, but
their channels are in the clients' order too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDING = 1e-5  # of the value range: how far outside it a turned-back pixel may land and be clipped


@dataclass(frozen=True)
class ClientValues:
    """Per-channel ``mean`` and ``std`` (``std > 0``; both empty: not normalized), in the units of the
    pixels and the clients' channel order; ``bgr``: the clients' channels are blue, green, red."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    bgr: bool = False

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel each, got {self.mean} and {self.std}")
        if not all(np.isfinite(self.mean)) or not all(s > 0 and np.isfinite(s) for s in self.std):
            raise ValueError(f"mean must be finite and std positive and finite, got {self.mean} and {self.std}")
        if not self.mean and not self.bgr:
            raise ValueError("ClientValues that neither normalize nor reverse the channels: use None (pixels)")

    @classmethod
    def of(cls, spec) -> "ClientValues | None":
        """The bundle's ``input`` (models/bundle.py InputSpec) -> what its clients send, None when they
        send RGB pixels."""
        bgr = spec.channel_order == "BGR"
        if not spec.normalized and not bgr:
            return None
        return cls(tuple(spec.mean) if spec.normalized else (), tuple(spec.std) if spec.normalized else (), bgr)

    @property
    def normalizes(self) -> bool:
        return bool(self.mean)

    def _shaped(self, values: tuple[float, ...], ndim: int, channel_axis: int) -> np.ndarray:
        shape = [1] * ndim
        shape[channel_axis] = len(values)
        return np.asarray(values, dtype=np.float32).reshape(shape)

    @staticmethod
    def _reversed(x: np.ndarray, channel_axis: int) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[channel_axis] = slice(None, None, -1)
        return x[tuple(index)]

    def rgb(self, x: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """``x`` in the clients' channel order -> a view in RGB order (``x`` itself unless BGR): for
        values that are pixels already (UINT8 levels), which are not de-normalized."""
        return self._reversed(x, channel_axis) if self.bgr else x

    def pixels(self, x: np.ndarray, channel_axis: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """The clients' values ``x`` -> RGB pixels (float32): ``x * std + mean`` along ``channel_axis``,
        the channels reversed for BGR, in one pass written to ``out`` (a new array when None; not
        ``x`` itself when the channels are reversed)."""
        src = self.rgb(x, channel_axis)
        if not self.normalizes:
            if out is None:
                return np.array(src, dtype=np.float32)
            np.copyto(out, src, casting="same_kind")
            return out
        order = slice(None, None, -1 if self.bgr else 1)  # the statistics in the RGB order of ``src``
        out = np.multiply(src, self._shaped(self.std[order], x.ndim, channel_axis), out=out, dtype=np.float32)
        return np.add(out, self._shaped(self.mean[order], x.ndim, channel_axis), out=out)

    def values(self, x: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """RGB pixels ``x`` -> what the clients send: the channels reversed for BGR, then ``(x - mean) /
        std`` along ``channel_axis``; a new float32 array."""
        src = self.rgb(x, channel_axis)  # the reversal is its own inverse
        if not self.normalizes:
            return np.array(src, dtype=np.float32)
        out = np.subtract(src, self._shaped(self.mean, x.ndim, channel_axis), dtype=np.float32)
        return np.divide(out, self._shaped(self.std, x.ndim, channel_axis), out=out)
