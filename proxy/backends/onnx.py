"""In-process ONNX Runtime backend: the bundle's ONNX backbone run inside the proxy.

``OnnxBackend`` is the proxy's ``classify`` step (thread-safe: ``InferenceSession.run`` may be
called concurrently and releases the GIL). ``OnnxClassifier`` is the same session seen as a
:class:`robustgate.defenses.base.Classifier` for detectors that query the local backbone
(MagNet's divergence, SafetyNet's late activations from the "features" output).
``OnnxBackend.infer_with_features`` returns logits and features from one session call: the
pipeline's shared pass (defenses/pipeline.py) then spares SafetyNet a second backbone run.

Providers from ``device``: ``cpu`` -> CPUExecutionProvider; ``cuda`` -> CUDAExecutionProvider
(an error when this onnxruntime build lacks it); ``auto`` -> CUDA when available, else CPU.
Without onnxruntime-gpu, ``robustgate serve`` runs ``device: cuda`` (and ``auto`` on a machine
with a CUDA device) on the torch twin instead (:func:`has_cuda_provider`; proxy/serve.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from robustgate.models.bundle import Bundle
from robustgate.models.output_kind import backbone_model, backbone_source
from robustgate.proxy.backends.base import Backend, BackendError, ModelMeta, TensorMeta

# session config entries for ``spinning`` (OnnxBackend): False -- pool threads sleep whenever they
# wait, between batches and at every operator inside one (an idle proxy at 40 requests/s used 0.96
# of a core with spinning, 0.20 without: bench/results/hardening.overload.md); True -- ONNX
# Runtime's default, they busy-wait for work; "run" -- they busy-wait while a run is in progress
# (no wake-up per operator) and stop as soon as the last concurrent run returns
# (``session.force_spinning_stop``), so an idle proxy does not spin. Under saturation runs follow
# each other and "run" spins as True does (which made the overload p99 worse: docs/OPERATIONS.md).
SPINNING_CONFIG: dict[bool | str, dict[str, str]] = {
    False: {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
    True: {},
    "run": {"session.force_spinning_stop": "1"},
}
_ORT_TYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(int64)": "INT64"}


def has_cuda_provider() -> bool:
    """Whether this onnxruntime build can run on a CUDA device (onnxruntime-gpu)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers_for(device: str) -> list[str]:
    """The execution providers for ``device`` (cpu | cuda | auto); ValueError when unavailable."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                "backend.onnxruntime.device is 'cuda' but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use device: cpu/auto"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
    raise ValueError(f"backend.onnxruntime.device must be cpu, cuda or auto, got {device!r}")


class OnnxBackend(Backend):
    """Runs ``bundle``'s ONNX backbone with ONNX Runtime; returns its logits output."""

    def __init__(self, bundle: Bundle, device: str = "cpu", intra_op_threads: int = 0, inter_op_threads: int = 0,
                 spinning: bool | str = False):
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise ValueError("intra_op_threads and inter_op_threads must be >= 0 (0 = onnxruntime default)")
        if spinning not in SPINNING_CONFIG:
            raise ValueError(f"spinning must be false, true or 'run', got {spinning!r}")
        self.bundle = bundle
        self.device = device
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        for key, value in SPINNING_CONFIG[spinning].items():  # when pool threads busy-wait (SPINNING_CONFIG)
            opts.add_session_config_entry(key, value)
        path = bundle.onnx_path()  # BundleError for a bundle imported from a model server
        providers = providers_for(device)
        self._opts, self._providers = opts, providers
        try:  # a model that answers probabilities runs with their logarithms appended (models/output_kind.py)
            self.session = ort.InferenceSession(backbone_source(bundle), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types; name the file
            raise ValueError(f"{path}: ONNX Runtime could not load the backbone: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.logits_output = bundle.spec.backbone.logits_output
        if self.logits_output not in self.output_names:
            raise ValueError(
                f"{path}: bundle says logits output {self.logits_output!r} but the graph has {self.output_names}"
            )
        self.features_output = bundle.spec.backbone.features_output or ("features" if "features" in self.output_names else None)
        if self.features_output is not None and self.features_output not in self.output_names:
            raise ValueError(f"{path}: bundle says features output {self.features_output!r} but the graph has {self.output_names}")
        self._closed = False

    def run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Raw session call: ``x`` ``[M, C, H, W]`` float32 -> the named outputs."""
        if self._closed:
            raise BackendError("UNAVAILABLE", "onnxruntime backend is closed")
        try:
            return self.session.run(outputs, {self.input_name: x})
        except Exception as exc:  # ORT's errors are not a stable hierarchy; report as INTERNAL
            raise BackendError("INTERNAL", f"onnxruntime failed: {exc}") from exc

    def infer(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        # [M, C, H, W] -> [M, K]; ORT has no per-call deadline, the batch is short
        (logits,) = self.run(np.ascontiguousarray(x, dtype=np.float32), [self.logits_output])
        return np.asarray(logits, dtype=np.float32)

    def infer_with_features(self, x: np.ndarray, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        # one session call for both outputs: the pipeline's detectors reuse the classify pass
        if self.features_output is None:
            return self.infer(x, timeout), None
        logits, feats = self.run(np.ascontiguousarray(x, dtype=np.float32), [self.logits_output, self.features_output])
        return np.asarray(logits, dtype=np.float32), np.asarray(feats, dtype=np.float32).reshape(x.shape[0], -1)

    def fused_pass(self, score_models: dict[str, "onnx.ModelProto"]) -> "FusedPass":
        """A second session of the backbone with these stages' score (or embedding) graphs fused in
        (proxy/backends/fuse.py), for the pipeline's shared pass; this backend's own session is
        unchanged. ValueError when a graph cannot be fused or ONNX Runtime refuses the result."""
        from robustgate.proxy.backends.fuse import fuse_score_graphs

        path = self.bundle.onnx_path()
        fused, outputs = fuse_score_graphs(backbone_model(self.bundle), score_models)
        try:
            session = ort.InferenceSession(fused.SerializeToString(), sess_options=self._opts, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: ONNX Runtime could not load the backbone fused with {sorted(outputs)}: {exc}") from exc
        return FusedPass(self, session, outputs)

    def info(self) -> dict[str, str]:
        provider = self.session.get_providers()[0]  # the first provider is the one that runs the graph
        return {"kind": "onnxruntime", "device": "cuda" if provider == "CUDAExecutionProvider" else "cpu",
                "provider": provider}

    def ready(self) -> bool:
        return not self._closed

    def metadata(self) -> ModelMeta:
        inp = self.bundle.input
        outs = {o.name: o for o in self.session.get_outputs()}
        logits = outs[self.logits_output]
        k = len(self.bundle.classes)
        return ModelMeta(
            name=self.bundle.name,
            versions=("1",),
            platform="onnxruntime_onnx",
            inputs=(TensorMeta(inp.name, "FP32", (-1, *inp.shape)),),
            outputs=(TensorMeta(self.logits_output, _ORT_TYPES.get(logits.type, "FP32"), (-1, k)),),
        )

    def classifier(self) -> "OnnxClassifier":
        return OnnxClassifier(self)

    def close(self) -> None:
        self._closed = True


class FusedPass:
    """The backbone and fused detector scores in one session call: ``x`` ``[M, C, H, W]`` float32
    -> (logits ``[M, K]``, features ``[M, D]`` or None, stage -> score ``[M]``, or a stateful
    stage's embedding ``[M, d]``)."""

    def __init__(self, backend: OnnxBackend, session: ort.InferenceSession, score_outputs: dict[str, str]):
        self.backend, self.session, self.score_outputs = backend, session, dict(score_outputs)
        self.stages = tuple(self.score_outputs)
        self._names = [backend.logits_output, *([backend.features_output] if backend.features_output else []),
                       *self.score_outputs.values()]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        if self.backend._closed:
            raise BackendError("UNAVAILABLE", "onnxruntime backend is closed")
        try:
            got = self.session.run(self._names, {self.backend.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        except Exception as exc:  # as OnnxBackend.run
            raise BackendError("INTERNAL", f"onnxruntime failed: {exc}") from exc
        logits, rest = np.asarray(got[0], dtype=np.float32), got[1:]
        feats = None
        if self.backend.features_output:
            feats, rest = np.asarray(rest[0], dtype=np.float32).reshape(x.shape[0], -1), rest[1:]
        return logits, feats, {stage: np.asarray(s, dtype=np.float32) for stage, s in zip(self.stages, rest)}


class OnnxClassifier:
    """The backbone as a :class:`~robustgate.defenses.base.Classifier` (torch in, torch out).

    Not differentiable: it serves detectors in the proxy; the red team uses the torch twin."""

    def __init__(self, backend: OnnxBackend):
        self.backend = backend

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.backend.infer(arr))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, D]
        if self.backend.features_output is None:
            raise ValueError(
                f"bundle {self.backend.bundle.name!r}: the ONNX backbone has no features output "
                f"(outputs: {self.backend.output_names}); re-export it with features for this detector"
            )
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (feats,) = self.backend.run(arr, [self.backend.features_output])
        return torch.from_numpy(np.asarray(feats, dtype=np.float32)).reshape(arr.shape[0], -1)
