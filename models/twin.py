"""The torch twin of a bundle's backbone: the same weights as the ONNX graph, differentiable.

``load_backbone(bundle)`` rebuilds the architecture named in ``bundle.yaml`` (``backbone.arch``
with ``backbone.arch_kwargs``) and loads the safetensors state dict (checksum already verified by
``Bundle.load``), strictly: a missing or unexpected key fails. The red team attacks this twin;
the export's parity check guarantees it computes what the served ONNX graph computes.

``TorchClassifier(module)`` adapts it to :class:`robustgate.defenses.base.Classifier`. It does
not disable gradients (adaptive attacks differentiate through detectors that query it); wrap
calls in ``torch.no_grad()`` when gradients are not wanted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from robustgate.models.archs import build_arch
from robustgate.models.bundle import Bundle, BundleError


class NoTwin(BundleError):
    """The bundle's backbone has no torch twin: only attacks that need no gradient apply to it."""


def has_twin(bundle: Bundle) -> bool:
    """Whether :func:`load_backbone` can build a differentiable twin of the bundle's backbone."""
    return bundle.spec.backbone.weights is not None


def load_backbone(bundle: Bundle | str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Bundle (or its directory) -> the eval-mode ``nn.Module`` twin on ``device``; :class:`NoTwin`
    when the bundle has none."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    spec = bundle.spec.backbone
    if not has_twin(bundle):
        raise NoTwin(f"{bundle.root}: backbone has no safetensors weights, so it has no torch twin")
    try:
        module = build_arch(spec.arch, **spec.arch_kwargs)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.root}: cannot build backbone.arch {spec.arch!r} with {spec.arch_kwargs}: {exc}") from exc
    state = load_file(str(bundle.path(spec.weights)), device="cpu")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.root}: {spec.weights.path} does not fit {spec.arch}: {exc}") from exc
    return module.to(device).eval()


class TorchClassifier:
    """A torch backbone as a ``Classifier``: ``logits(x) -> [N, K]``, ``features(x) -> [N, D]``.

    ``x`` is ``[N, C, H, W]`` raw pixels; it is moved to the module's device and the outputs are
    returned on ``x``'s device.
    """

    def __init__(self, module: nn.Module):
        if not hasattr(module, "features"):
            raise ValueError(f"{type(module).__name__} has no features(x); every robustgate backbone needs one")
        self.module = module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        return self.module(x.to(self.device)).to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, D]
        return self.module.features(x.to(self.device)).to(x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)
