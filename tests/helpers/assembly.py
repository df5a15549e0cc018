"""Red-team tests build pipelines the way ``robustgate eval`` does: through the one assembly
(defenses/assemble.py), from a list of stage dicts as written in a pipeline YAML."""

from __future__ import annotations

from robustgate.defenses.assemble import PipelineConfig, PipelineRunner, build_runner, build_stages


def stages_of(stages: list[dict], bundle, twin: bool = False, device: str | None = None):
    """``build_stages`` of a pipeline holding ``stages`` (validated by the proxy's PipelineConfig)."""
    return build_stages(PipelineConfig(stages=stages), bundle, twin=twin, device=device)


def served(bundle, stages: list[dict], seed: int | None = None) -> PipelineRunner:
    """The proxy's runner for ``stages`` on the proxy's ONNX Runtime backend (one CPU thread)."""
    from robustgate.proxy.backends.onnx import OnnxBackend, OnnxClassifier

    backend = OnnxBackend(bundle, intra_op_threads=1, inter_op_threads=1)
    return build_runner(PipelineConfig(stages=stages, seed=seed), bundle, backend, OnnxClassifier(backend))
