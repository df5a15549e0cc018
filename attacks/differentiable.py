"""The attackable twin of the served pipeline: the same stages, run on the torch backbone.

The proxy runs the stages of ``defenses.assemble.build_stages`` with the bundle's ONNX graph as
``classify``. An attacker needs gradients, so :class:`PipelineTwin` computes the same pipeline
output, on the stages ``build_stages(..., twin=True)`` builds, with the torch twin of that graph
(``models.twin.load_backbone``) as an
``nn.Module`` mapping ``[N, C, H, W]`` pixels in ``[0, 1]`` to logits ``[N, K]`` -- the form
torchattacks expects. A parity test ties the two together (tests/attacks/test_parity.py).

Gradient options (Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018):

- **BPDA**: a purifier that declares ``differentiable = False`` (JPEG, bit-depth reduction, ...)
  runs its real ``purify`` in the forward pass while the backward pass goes through its
  ``bpda`` surrogate (identity by default: straight-through). With ``bpda=False`` the purifier
  output is detached, i.e. the attacker sees no gradient through it (what a naive attack gets).
- **EOT**: randomized stages draw fresh randomness on every forward call (``generator=None``
  unless the caller fixes one), so an attack that averages gradients over ``k`` calls
  (torchattacks ``EOTPGD``, :mod:`robustgate.attacks.joint`) computes the EOT gradient.
- **Detectors** score the raw input; :meth:`PipelineTwin.detector_scores` exposes each score
  (with gradients where the detector is differentiable) for joint losses that evade detection.

Ensembles: the served answer is ``aggregate`` over the ``T`` copies; the twin's logits are
``log(mean_t softmax(f(copy_t)))`` -- the served value for averaging ensembles (TTE) and the
standard differentiable surrogate of a smoothed classifier (Salman et al., NeurIPS 2019) whose
served answer is a vote. Known limit: for vote-based ensembles the twin's forward value is that
surrogate, not the vote; the runner always *scores* attacks on the served pipeline.
"""

from __future__ import annotations

import torch
from torch import nn

from robustgate.defenses.base import Detector, Ensemble, Purifier
from robustgate.defenses.pipeline import Stage, split_stages, validate_stages


class ModuleClassifier:
    """A :class:`robustgate.defenses.base.Classifier` view of a torch module that keeps the
    autograd graph (detectors that query the backbone must pass gradients to a joint attack)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [N, K]
        return self.module(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, D]
        return self.module.features(x)


def straight_through(forward_value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """BPDA: the value of ``forward_value``, the gradient of ``surrogate`` (same shape)."""
    return surrogate + (forward_value - surrogate).detach()


class PipelineTwin(nn.Module):
    """``x`` ``[N, C, H, W]`` in ``[0, 1]`` -> pipeline logits ``[N, K]``, differentiable.

    Args:
        backbone: the torch twin of the served backbone (eval mode; its parameters are frozen
            here, the attack differentiates w.r.t. the input only).
        stages: the served stages (``defenses.assemble.build_stages(..., twin=True)``); detectors do
            not change the logits.
        bpda: use each non-differentiable purifier's ``bpda`` surrogate in the backward pass
            (True) or block the gradient there (False).
        generator: fixes the randomness of randomized stages (None: fresh draws every call,
            which is what EOT needs).
        precision: ``torch.bfloat16`` runs the differentiable purifiers' own computation (the
            diffusion sampler's UNet passes, forward and backward) under CPU/CUDA autocast in
            that precision; the backbone, detectors and BPDA surrogates stay float32. An
            attacker's choice that changes only how precisely the gradient is computed (the
            attacked examples are always scored on the float32 served pipeline); None: float32.
    """

    def __init__(self, backbone: nn.Module, stages: list[Stage], bpda: bool = True,
                 generator: torch.Generator | None = None, precision: torch.dtype | None = None):
        super().__init__()
        validate_stages(stages)  # the same checks the served DefendedModel makes
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.stages = list(stages)
        self.bpda = bpda
        self.generator = generator
        self.precision = precision
        self.classifier = ModuleClassifier(self.backbone)

    # ---- what the stage list holds ----------------------------------------------------------
    @property
    def detectors(self) -> list[Stage]:
        return split_stages(self.stages)[0]

    @property
    def purifiers(self) -> list[Stage]:
        return split_stages(self.stages)[1]

    @property
    def ensemble(self) -> Stage | None:
        return split_stages(self.stages)[2]

    @property
    def randomized(self) -> bool:
        """Some stage draws random numbers: attacks must use EOT."""
        return any(s.defense.randomized for s in self.stages if not isinstance(s.defense, Detector))

    @property
    def non_differentiable(self) -> list[str]:
        """Names of purifiers whose gradient the twin replaces by BPDA."""
        return [s.name for s in self.purifiers if not s.defense.differentiable]

    # ---- forward ------------------------------------------------------------------------------
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the purifiers in config order; ``[N, C, H, W]`` -> ``[N, C, H, W]``."""
        h = x
        for stage in self.purifiers:
            p: Purifier = stage.defense  # type: ignore[assignment]
            if p.differentiable:
                with torch.autocast(h.device.type, dtype=self.precision or torch.bfloat16,
                                    enabled=self.precision is not None):
                    h = p.purify(h, self.generator).to(x.dtype)
            else:
                value = p.purify(h.detach(), self.generator)
                h = straight_through(value, p.bpda(h)) if self.bpda else value.detach()
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        h = self.purify(x)
        ens_stage = self.ensemble
        if ens_stage is None:
            return self.backbone(h)
        ens: Ensemble = ens_stage.defense  # type: ignore[assignment]
        copies = ens.expand(h, self.generator)  # [N*T, C, H, W]
        probs = self.backbone(copies).softmax(-1)  # [N*T, K]
        probs = probs.view(x.shape[0], ens.copies, -1).mean(1)  # [N, K]
        return torch.log(probs.clamp_min(1e-12))

    def detector_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each detector's score of the raw input, ``{stage name: [N]}``; a score keeps its
        autograd graph when the detector is differentiable (check ``requires_grad``)."""
        return {s.name: s.defense.score(x, self.classifier).reshape(x.shape[0])  # type: ignore[attr-defined]
                for s in self.detectors}

    def thresholds(self) -> dict[str, float]:
        return {s.name: float(s.defense.threshold) for s in self.detectors  # type: ignore[attr-defined]
                if s.defense.threshold is not None}  # type: ignore[attr-defined]


class BackboneOnly(nn.Module):
    """The undefended backbone as an attack target (same interface as :class:`PipelineTwin`)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        return self.backbone(x)
