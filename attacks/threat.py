"""The threat model written beside every robustness number, and the checks every attack obeys.

DESIGN.md, "Honest evaluation": every number states the norm, epsilon, attack, steps, restarts,
EOT samples and how many test items. :class:`ThreatModel` carries exactly that; the runner
stores it in every result cell. :func:`check_perturbation` is asserted after *every* attack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

Norm = Literal["linf", "l2"]
Target = Literal["backbone", "pipeline", "endpoint"]
TOLERANCE = 1e-5  # float32 rounding of x + delta


@dataclass(frozen=True)
class ThreatModel:
    """``target``: what the attacker differentiates or queries -- the undefended ``backbone``
    (non-adaptive: its examples are then sent through the pipeline), the ``pipeline`` twin
    (adaptive), or the served ``endpoint`` by queries only (black-box)."""

    attack: str
    norm: Norm
    eps: float
    steps: int
    restarts: int = 1
    eot: int = 1
    target: Target = "backbone"
    queries: int | None = None  # black-box query budget per item
    n: int = 0

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        for key in ("steps", "restarts", "eot"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"{self.attack}", f"{self.norm} eps={self.eps:g}", f"steps={self.steps}",
                 f"restarts={self.restarts}", f"EOT={self.eot}", f"target={self.target}"]
        if self.queries is not None:
            parts.append(f"queries={self.queries}")
        parts.append(f"n={self.n}")
        return ", ".join(parts)


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``[N]`` norm of ``x_adv - x`` per item."""
    delta = (x_adv - x).flatten(1)  # [N, C*H*W]
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Projects ``x_adv`` onto the ``eps``-ball around ``x`` and the ``[0, 1]`` box.

    Only for attacks that are unbounded by construction (CW-L2, DeepFool): the bounded ones
    must stay in the ball by themselves, which :func:`check_perturbation` asserts."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)  # [N]
        delta = delta * (eps / n).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
    return (x + delta).clamp(0.0, 1.0)


def check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: float, who: str = "attack") -> None:
    """Raises ``AssertionError`` unless every ``x_adv`` item is finite, in ``[0, 1]`` and within
    ``eps`` of ``x`` in ``norm``."""
    x_adv, x = x_adv.detach(), x.detach()
    if x_adv.shape != x.shape:
        raise AssertionError(f"{who}: adversarial shape {tuple(x_adv.shape)} != input shape {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise AssertionError(f"{who}: adversarial examples contain NaN/Inf")
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise AssertionError(f"{who}: adversarial pixels in [{lo:.6g}, {hi:.6g}] leave the [0, 1] box")
    worst = float(perturbation_norm(x_adv, x, norm).max()) if len(x) else 0.0
    if worst > eps * (1 + TOLERANCE) + TOLERANCE:
        raise AssertionError(f"{who}: ||delta||_{norm} = {worst:.6g} exceeds eps = {eps:.6g}")
