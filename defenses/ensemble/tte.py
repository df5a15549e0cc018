"""Test-time transformation ensembling (TTE; Pérez et al., ICCV-W 2021, "Enhancing Adversarial
Robustness via Test-time Transformation Ensembling").

Each item is fanned out into ``T`` deterministic transformed copies (identity, horizontal flip,
small pixel shifts); the classifier runs once on all ``N*T`` copies and the answer is the
averaged softmax ``p(x) = 1/T sum_t softmax(f(tau_t(x)))``.

Known limits: TTE is deterministic and differentiable, so it does not obfuscate gradients; an
attacker who differentiates the averaged softmax (or uses EOT over the transformation set) sees
the true loss, and Pérez et al. report gains of a few points on top of adversarially trained
models, not robustness on its own. It multiplies inference cost by ``T``.

Transformations are written as strings so configs stay plain YAML: ``id``, ``hflip``,
``dx=<int>`` (shift right by that many pixels; negative = left), ``dy=<int>`` (down), or a shift
relative to the image's side, ``dx=<p>%`` / ``dy=<p>%`` (``p`` percent of the width / height,
rounded, at least one pixel: ``dx=6%`` is 2 pixels at 32x32 and 13 at 224x224), combined with
``+`` (e.g. ``hflip+dx=1``). The presets of 28x28 and 32x32 data sets shift by pixels, the
``imagefolder`` preset (a user's images of any size) by percent. Shifts pad by replicating the border (the usual crop-with-
padding augmentation keeps the image content; Fashion-MNIST's border is background anyway).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from robustgate.defenses.base import Ensemble, EnsembleResult, check_images, register

#: Per-dataset transformation sets. Digits must not be flipped (a flipped 2 is not a 2).
PRESETS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("id", "hflip", "dx=1", "dx=-1", "dy=1", "dy=-1"),
    "mnist": ("id", "dx=1", "dx=-1", "dy=1", "dy=-1"),
    "cifar10": ("id", "hflip", "dx=2", "dx=-2", "dy=2", "dy=-2", "hflip+dx=2", "hflip+dx=-2"),
    # cifar10's set with its 2 of 32 pixels as a share of the side, for any size
    "imagefolder": ("id", "hflip", "dx=6%", "dx=-6%", "dy=6%", "dy=-6%", "hflip+dx=6%", "hflip+dx=-6%"),
}
_SHIFT = re.compile(r"^(dx|dy)=(-?\d+(?:\.\d+)?%|-?\d+)$")


@dataclass(frozen=True)
class Transform:
    """A parsed transformation: optional horizontal flip, then a shift by ``(dy, dx)`` pixels plus
    ``(dy_pct, dx_pct)`` percent of the height and width (:meth:`pixels`)."""

    hflip: bool = False
    dy: int = 0
    dx: int = 0
    dy_pct: float = 0.0
    dx_pct: float = 0.0

    def pixels(self, h: int, w: int) -> tuple[int, int]:
        """``(dy, dx)`` in pixels for ``h x w`` images; a nonzero percentage is at least one pixel."""
        def px(pct: float, side: int) -> int:
            if pct == 0:
                return 0
            n = max(1, round(abs(pct) / 100 * side))
            return n if pct > 0 else -n
        return self.dy + px(self.dy_pct, h), self.dx + px(self.dx_pct, w)


def parse_transform(spec: str) -> Transform:
    """``"hflip+dx=1"`` -> ``Transform(hflip=True, dy=0, dx=1)``; ValueError on unknown parts."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tte: a transform must be a non-empty string, got {spec!r}")
    hflip, shift, pct = False, {"dx": 0, "dy": 0}, {"dx": 0.0, "dy": 0.0}
    for part in spec.split("+"):
        part = part.strip()
        if part == "id":
            continue
        if part == "hflip":
            hflip = True
            continue
        m = _SHIFT.match(part)
        if m is None:
            raise ValueError(f"tte: unknown transform part {part!r} in {spec!r} "
                             f"(use id, hflip, dx=<int>, dy=<int>, dx=<p>%, dy=<p>%)")
        if m.group(2).endswith("%"):
            pct[m.group(1)] += float(m.group(2)[:-1])
        else:
            shift[m.group(1)] += int(m.group(2))
    return Transform(hflip=hflip, dy=shift["dy"], dx=shift["dx"], dy_pct=pct["dy"], dx_pct=pct["dx"])


def shift_image(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``[N, C, H, W]`` shifted by ``dy`` rows down and ``dx`` columns right, border replicated."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")  # [N, C, H+2|dy|, W+2|dx|]
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top:top + h, left:left + w]


def apply_transform(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H, W]``; differentiable."""
    if t.hflip:
        x = x.flip(-1)
    return shift_image(x, *t.pixels(*x.shape[-2:]))


def expand_transforms(x: torch.Tensor, transforms: list[Transform]) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N*T, C, H, W]`` item-major (row ``i*T + t`` is ``tau_t(x_i)``)."""
    copies = torch.stack([apply_transform(x, t) for t in transforms], dim=1)  # [N, T, C, H, W]
    return copies.flatten(0, 1)


def average_softmax(logits: torch.Tensor, copies: int) -> torch.Tensor:
    """``[N*T, K]`` item-major logits -> ``[N, K]`` mean of the ``T`` softmax distributions."""
    if logits.dim() != 2 or logits.shape[0] % copies:
        raise ValueError(f"ensemble: expected [N*{copies}, K] logits, got shape {tuple(logits.shape)}")
    return logits.softmax(-1).view(-1, copies, logits.shape[-1]).mean(1)


@register
class TestTimeTransformEnsemble(Ensemble):
    """Averaged softmax over a fixed transformation set.

    Args:
        dataset: picks the preset transformation set (``fashion-mnist``, ``mnist``, ``cifar10``;
            ``imagefolder``: shifts relative to the image size, for any H x W).
        transforms: an explicit list of transform strings; overrides ``dataset``'s preset.
    """

    kind: ClassVar[str] = "tte"
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    __test__ = False  # not a pytest class despite the name

    def __init__(self, dataset: str = "fashion-mnist", transforms: list[str] | None = None):
        if transforms is None:
            if dataset not in PRESETS:
                raise ValueError(f"tte: unknown dataset {dataset!r}; presets: {', '.join(sorted(PRESETS))}")
            specs = list(PRESETS[dataset])
        else:
            if isinstance(transforms, str) or not isinstance(transforms, (list, tuple)) or not transforms:
                raise ValueError(f"tte: transforms must be a non-empty list of strings, got {transforms!r}")
            specs = list(transforms)
        self._transforms = [parse_transform(s) for s in specs]
        self.dataset = dataset
        self.transforms = None if transforms is None else list(transforms)

    @property
    def copies(self) -> int:
        return len(self._transforms)

    def expand(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="tte")
        h, w = x.shape[-2:]
        for t in self._transforms:
            dy, dx = t.pixels(h, w)
            if abs(dy) >= h or abs(dx) >= w:
                raise ValueError(f"tte: shift ({dy}, {dx}) does not fit images of size {h}x{w}")
        return expand_transforms(x, self._transforms)

    def aggregate(self, logits: torch.Tensor) -> EnsembleResult:
        probs = average_softmax(logits, self.copies)  # [N, K]
        return EnsembleResult(probs=probs, abstain=torch.zeros(probs.shape[0], dtype=torch.bool))
