"""ONNX export of a backbone, with a parity check, and writing it into a bundle.

``export_onnx`` writes a single-file ONNX graph (``torch.onnx.export``, the torch.export-based
exporter) with input ``input`` ``[batch, C, H, W]`` and output ``logits`` ``[batch, K]`` -- plus,
with ``features=True``, a second output ``features`` ``[batch, D]`` (the late-stage ReLU
activations SafetyNet needs). The batch axis is dynamic. Right after writing, ONNX Runtime runs
the file on a probe batch and its outputs must equal torch's within ``atol`` (1e-4): an export
that does not match raises :class:`ExportError` instead of producing a silently different model.

``write_bundle`` exports the backbone, saves the torch twin's state dict as safetensors (the red
team differentiates the twin) and writes ``bundle.yaml`` with checksums, the architecture name and
keyword arguments (``robustgate.models.twin.load_backbone`` rebuilds it), the training recipe, the
measured metrics and provenance.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from robustgate.models.bundle import SCHEMA_VERSION, BackboneSpec, Bundle, BundleSpec, InputSpec, artifact, provenance

ONNX_FILE = "backbone.onnx"
WEIGHTS_FILE = "backbone.safetensors"
OPSET = 18

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported ONNX graph does not reproduce the torch model."""


class _WithFeatures(nn.Module):
    """Exports ``(logits, features)`` from one pass: ``logits = head(features(x))``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone.features(x)  # [N, D]
        return self.backbone.head(f), f


def _exportable(module: nn.Module, features: bool) -> nn.Module:
    if not features:
        return module
    if not hasattr(module, "features") or not hasattr(module, "head"):
        raise ValueError(f"{type(module).__name__} needs features() and head to export features")
    return _WithFeatures(module)


def export_onnx(
    module: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    features: bool = True,
    atol: float = 1e-4,
    probe: torch.Tensor | None = None,
) -> dict[str, float]:
    """Writes ``module`` (eval mode, CPU) to ``path`` and checks ONNX Runtime parity.

    ``input_shape`` is ``(C, H, W)``; ``probe`` (optional ``[N, C, H, W]`` pixels in [0, 1]) is
    added to the random probe batch. Returns the max absolute differences per output.
    """
    import onnxruntime as ort

    if atol <= 0:
        raise ValueError(f"atol must be positive, got {atol}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    device = next(module.parameters()).device
    module = module.eval().cpu()
    try:
        graph = _exportable(module, features).eval()
        example = torch.rand(4, *input_shape)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        output_names = ["logits", "features"] if features else ["logits"]
        torch.onnx.export(
            graph, (example,), str(path), input_names=["input"], output_names=output_names,
            dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, external_data=False,
            verbose=False,
        )
        # Parity: random pixels of several batch sizes (the axis must really be dynamic), plus the
        # caller's real images, through ONNX Runtime and torch.
        gen = torch.Generator().manual_seed(0)
        probes = [torch.rand(1, *input_shape, generator=gen), torch.rand(7, *input_shape, generator=gen)]
        if probe is not None:
            probes.append(probe.detach().float().cpu())
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diffs = {name: 0.0 for name in output_names}
        for x in probes:
            with torch.no_grad():
                expected = graph(x)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = session.run(output_names, {"input": x.numpy()})
            for name, e, g in zip(output_names, expected, got):
                if g.shape != tuple(e.shape):
                    raise ExportError(f"{path}: ONNX output {name} has shape {g.shape}, torch {tuple(e.shape)}")
                diffs[name] = max(diffs[name], float(np.abs(g - e.numpy()).max()))
        bad = {k: v for k, v in diffs.items() if not v <= atol}
        if bad:
            raise ExportError(f"{path}: ONNX Runtime differs from torch by {bad} (> atol {atol}); not exporting")
        log.info("exported %s; max |onnx - torch| = %s", path, diffs)
        return diffs
    finally:
        module.to(device).train(was_training)


def write_bundle(
    out: str | Path,
    module: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    classes: list[str],
    input_shape: tuple[int, int, int],
    name: str | None = None,
    features: bool = True,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    seed: int | None = None,
    extra_provenance: dict[str, Any] | None = None,
    probe: torch.Tensor | None = None,
) -> Bundle:
    """Exports ``module`` into the bundle directory ``out`` and returns the loaded, verified bundle.

    An existing ``out`` is replaced (its fitted defenses belong to the old backbone and would no
    longer be valid). The normalization documented in ``input`` is read from the module's
    ``normalize`` buffers.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    module = module.eval()
    parity = export_onnx(module, tmp / ONNX_FILE, input_shape, features=features, probe=probe)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"arch": arch})
    mean = std = ()
    norm = getattr(module, "normalize", None)
    if norm is not None:
        mean = tuple(round(float(v), 6) for v in norm.mean.flatten())
        std = tuple(round(float(v), 6) for v in norm.std.flatten())
    spec = BundleSpec(
        schema_version=SCHEMA_VERSION,
        name=name or out.name,
        input=InputSpec(shape=tuple(input_shape), mean=mean, std=std),
        classes=list(classes),
        backbone=BackboneSpec(
            onnx=artifact(tmp, ONNX_FILE),
            weights=artifact(tmp, WEIGHTS_FILE),
            arch=arch,
            arch_kwargs=_plain(arch_kwargs),
            logits_output="logits",
            features_output="features" if features else None,
            recipe=_plain(recipe or {}),
            metrics=_plain({**(metrics or {}), "export_parity_max_abs_diff": parity}),
        ),
        provenance=provenance(seed=seed, **(extra_provenance or {})),
    )
    Bundle(tmp, spec).save()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return Bundle.load(out)


def _plain(value: Any) -> Any:
    """Tuples -> lists, numpy/torch scalars -> Python numbers, so YAML stays plain and safe."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
