"""In-process torch backend: the bundle's torch twin (models/twin.py) as the proxy's ``classify`` step.

``backend.kind: torch`` runs the twin on the pipeline's device (``backend.torch.device``, default:
``pipeline.device``), under ``torch.inference_mode()``, optionally under autocast
(``backend.precision: float32 | bfloat16 | float16``; the accuracy cost is measured by
bench/gpu/precision.py). It is also what ``backend.kind: onnxruntime`` with ``device: cuda`` falls
back to when this onnxruntime build has no CUDA provider (proxy/serve.py, ``make_backend``).

Besides the numpy interface of :class:`~robustgate.proxy.backends.base.Backend`, a torch backend
takes and returns torch tensors (:attr:`accepts_tensors`, :meth:`infer_tensor`,
:meth:`infer_with_features_tensor`): the pipeline runner (defenses/assemble.py) then keeps the
batch on the device from the input copy to the verdict. Logits and features always come back in
float32, whatever the compute precision.

Thread-safe: a module in eval mode under inference_mode holds no per-call state.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from robustgate.models import levels
from robustgate.models.bundle import Bundle
from robustgate.proxy.backends.base import Backend, BackendError, ModelMeta, TensorMeta

log = logging.getLogger("robustgate.proxy")

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def logits_and_features(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass: ``x`` ``[N, C, H, W]`` -> (logits ``[N, K]``, features ``[N, D]`` or None).

    A converted ONNX twin returns every graph output of one call; the project's own architectures
    (models/archs.py) compute ``forward(x) = head(features(x))``, so the head is applied to the
    features; any other module gets two calls."""
    outputs = getattr(module, "outputs", None)
    if outputs is not None and getattr(module, "_features_index", None) is not None:  # models.twin.OnnxTwin
        out = outputs(x)
        return out[module._logits_index], out[module._features_index].reshape(x.shape[0], -1)
    if outputs is not None:  # an OnnxTwin without a features output
        return module(x), None
    feats = module.features(x).reshape(x.shape[0], -1)
    head = getattr(module, "head", None)
    return (head(feats) if head is not None else module(x)), feats


class TorchBackend(Backend):
    """Runs ``bundle``'s torch twin on ``device`` (``cpu`` or ``cuda``, already resolved) at
    ``precision``. ``provider`` names why it runs (``torch``, or ``torch (onnxruntime has no CUDA
    provider)`` for the fallback) in the log and in ``robustgate_backend_info``."""

    accepts_tensors = True
    kind = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "float32", provider: str = "torch"):
        from robustgate.models.twin import NoTwin, load_backbone

        if precision not in PRECISIONS:
            raise ValueError(f"backend.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"torch backend device must be cpu or cuda (resolved), got {device!r}")
        self.bundle, self.device, self.precision, self.provider = bundle, torch.device(device), precision, provider
        try:
            self.module = load_backbone(bundle, device)
        except NoTwin as exc:
            raise ValueError(f"backend.kind torch needs the bundle's torch twin: {exc}") from exc
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._dtype = PRECISIONS[precision]
        # a model that takes UINT8 levels: its twin passes the rounding straight through (for gradients),
        # so the pixels are rounded onto the levels here, and the answer is the model's
        uint8 = bundle.spec.backbone.recipe.get("input_datatype") == "uint8"
        self._levels = tuple(bundle.input.value_range) if uint8 else None
        self.features_output = bundle.spec.backbone.features_output or "features"
        self._closed = False
        log.info("backend: torch twin of %s on %s at %s (%s)", bundle.name, self.device, precision, provider)

    # ---- tensors in, tensors out (the runner's device path) ------------------------------------
    def _autocast(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def _check(self) -> None:
        if self._closed:
            raise BackendError("UNAVAILABLE", "torch backend is closed")

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        return x if self._levels is None else levels.on_levels_tensor(x, self._levels)

    def infer_with_features_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``[M, C, H, W]`` on any device -> float32 (logits ``[M, K]``, features ``[M, D]`` or
        None) on the backend's device (the caller moves them, if it wants them elsewhere)."""
        self._check()
        try:
            with torch.inference_mode(), self._autocast():
                logits, feats = logits_and_features(self.module, self._pixels(x))
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError("RESOURCE_EXHAUSTED", f"torch backend out of device memory: {exc}") from exc
        except RuntimeError as exc:
            raise BackendError("INTERNAL", f"torch backend failed: {exc}") from exc
        return logits.float(), None if feats is None else feats.float()

    def infer_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[M, C, H, W]`` -> float32 logits ``[M, K]`` on the backend's device."""
        self._check()
        try:
            with torch.inference_mode(), self._autocast():
                logits = self.module(self._pixels(x))
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError("RESOURCE_EXHAUSTED", f"torch backend out of device memory: {exc}") from exc
        except RuntimeError as exc:
            raise BackendError("INTERNAL", f"torch backend failed: {exc}") from exc
        return logits.float()

    # ---- the Backend interface (numpy in, numpy out) -------------------------------------------
    def infer(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        # [M, C, H, W] float32 -> [M, K]; no per-call deadline, the batch is short
        return self.infer_tensor(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).cpu().numpy()

    def infer_with_features(self, x: np.ndarray, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        logits, feats = self.infer_with_features_tensor(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return logits.cpu().numpy(), None if feats is None else feats.cpu().numpy()

    def info(self) -> dict[str, str]:
        """Labels of ``robustgate_backend_info`` (proxy/metrics.py)."""
        return {"kind": "torch", "device": self.device.type, "provider": self.provider}

    def ready(self) -> bool:
        return not self._closed

    def metadata(self) -> ModelMeta:
        inp = self.bundle.input
        return ModelMeta(
            name=self.bundle.name, versions=("1",), platform="pytorch_libtorch",
            inputs=(TensorMeta(inp.name, "FP32", (-1, *inp.shape)),),
            outputs=(TensorMeta(self.bundle.spec.backbone.logits_output, "FP32", (-1, len(self.bundle.classes))),),
        )

    def classifier(self):
        """The twin as a ``Classifier`` for detectors that query the local backbone (on the device)."""
        from robustgate.models.twin import TorchClassifier

        return TorchClassifier(self.module)

    def close(self) -> None:
        self._closed = True
