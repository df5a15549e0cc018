"""The classifier backend interface: where the proxy's ``classify`` step runs.

Three implementations: ``onnx.OnnxBackend`` (in-process ONNX Runtime), ``torch.TorchBackend``
(the bundle's torch twin in-process, on the CPU or a GPU) and ``upstream.UpstreamBackend`` (an
upstream Open Inference Protocol server over a pooled gRPC channel). Backends are synchronous and thread-safe: the pipeline runs in a worker thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class BackendError(RuntimeError):
    """The backend could not answer. ``code`` is the gRPC status name the proxy should answer
    with: ``UNAVAILABLE`` (unreachable / retries exhausted), ``DEADLINE_EXCEEDED``, ``INTERNAL``
    (malformed answer), or the upstream's own code when it rejected the request."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a variable dimension (the batch axis)


@dataclass(frozen=True)
class ModelMeta:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


class Backend(ABC):
    @abstractmethod
    def infer(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """``x``: ``[M, C, H, W]`` float32 C-contiguous pixels -> ``[M, K]`` float32 logits.

        ``timeout``: seconds left of the client's deadline (None = no deadline). Raises
        :class:`BackendError` on failure."""

    def infer_with_features(self, x: np.ndarray, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits ``[M, K]`` and, when this backend computes them in the same pass, the backbone's
        late features ``[M, D]`` (what SafetyNet reads), else None. Default: :meth:`infer` and
        None -- detectors then query the bundle's local copy of the backbone."""
        return self.infer(x, timeout), None

    def fused_pass(self, score_models: dict):
        """A callable ``x`` -> (logits, features or None, stage -> ``[M]`` score or ``[M, d]``
        embedding) computing these stages' graphs in the backbone's own call (proxy/backends/fuse.py), or None when
        this backend cannot fuse (the default: an upstream runs only its own model)."""
        return None

    @abstractmethod
    def ready(self) -> bool:
        """True when the backend can answer now (session loaded / upstream reports ready)."""

    @abstractmethod
    def metadata(self) -> ModelMeta:
        """The served model's metadata (the upstream's own, or derived from the bundle)."""

    def close(self) -> None:
        """Releases sessions/channels. Default: nothing to release."""

    #: True when the backend also takes and returns torch tensors (``infer_tensor``,
    #: ``infer_with_features_tensor``): the pipeline runner then keeps the batch on its device
    accepts_tensors = False

    def info(self) -> dict[str, str]:
        """``kind``, ``device`` and ``provider`` labels of ``robustgate_backend_info`` (proxy/metrics.py)."""
        return {"kind": type(self).__name__.removesuffix("Backend").lower(), "device": "remote", "provider": "grpc"}
