"""Pipeline assembly: config stages + bundle + backend -> a runnable defended model per batch.

Each configured stage becomes ``defenses.base.build_from_bundle(kind, name, params, ...)``: when
the bundle holds a fitted defense under the stage's name, its kind must match, its params are the
base (the stage's ``params`` are merged over them), its artifact files (checksums verified by
``Bundle.load``) are loaded with ``load_artifacts`` and its calibrated threshold is used unless
the stage sets ``threshold``; a defense that runs a fitted model but has none in the bundle is
refused at start. The classify step is the backend's ``infer`` (torch <-> numpy at
the edge), given the time left until the batch's latest client deadline (none when one of its
requests has none; proxy/batcher.py).

Randomness: every batch gets a fresh ``torch.Generator`` seeded from ``os.urandom`` (an attacker
cannot predict the noise), unless ``pipeline.seed`` is set (tests), then each batch is seeded
with it.

Threads: ``robustgate serve`` calls :func:`pin_torch_threads` once at start. The pipeline's torch
work (input checks, score arithmetic, quantization) is small per batch, next to the ONNX Runtime
sessions that do the compute on their own thread pools; torch's OpenMP pool on cores shared with
those sessions (and with other processes) stalls at its barriers instead -- measured on the shared
2-core machine: the range check of one batch of 64 images took 74 ms with torch's 2 threads, 1 ms
with 1 (bench/results/detect.proxy_cost.md). The Kubernetes sidecar sets OMP_NUM_THREADS=1 for
the same reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from robustgate.defenses.base import Classifier, Detector, Ensemble, build_from_bundle
from robustgate.defenses.pipeline import DefendedModel, PipelineResult, Stage, split_stages
from robustgate.models.bundle import Bundle
from robustgate.proxy.backends.base import Backend
from robustgate.proxy.config import PipelineConfig


def pin_torch_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Sets torch's intra-op threads to 1 for the proxy process, unless ``OMP_NUM_THREADS`` is set
    (torch then follows it); returns the thread count in effect. Process-wide: call it from the
    serving entry point only (module docstring, "Threads")."""
    if "OMP_NUM_THREADS" not in environ:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def build_stages(cfg: PipelineConfig, bundle: Bundle) -> list[Stage]:
    """The configured stages, built and loaded; ValueError naming the stage on any problem."""
    stages = []
    for i, sc in enumerate(cfg.stages):
        defense = build_from_bundle(sc.kind, sc.name, dict(sc.params), sc.threshold, bundle,
                                    where=f"pipeline.stages.{i} ({sc.name})")
        stages.append(Stage(name=sc.name, defense=defense, action=sc.action))
    return stages


@dataclass
class PipelineRunner:
    """Runs one batch through the stages with the backend as classifier (synchronous; call it
    from a worker thread)."""

    stages: list[Stage]
    backend: Backend
    classifier: Classifier | None
    failure_policy: str = "fail-closed"
    seed: int | None = None
    share_features: bool = True  # the shared classify pass (defenses/pipeline.py); False: as before
    max_fanout_items: int | None = None  # an ensemble's copies per backend call (pipeline.max_fanout_items)

    def __post_init__(self):
        # validates the stage list once at start (the per-batch models reuse these stages)
        DefendedModel(self.stages, self._classify_with(None), self.classifier, self.failure_policy)
        self.fused = self._fuse()
        # whether the batch has a front half worth a thread of its own (:meth:`prepare`); asked per batch
        self.has_purifiers = bool(split_stages(self.stages)[1])

    def _fuse(self):
        """The backend's fused pass (proxy/backends/fuse.py) for the detectors that offer a score
        graph, when the pipeline has a shared pass (detectors only) and the backend can fuse
        (Backend.fused_pass); else None. A detector that fuses here runs in the backbone's session call."""
        detectors, purifiers, ensemble = split_stages(self.stages)
        if not (self.share_features and detectors and not purifiers and ensemble is None):
            return None
        models = {s.name: m for s in detectors if (m := s.defense.onnx_score_model()) is not None}
        return self.backend.fused_pass(models) if models else None

    @property
    def detector_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if isinstance(s.defense, Detector))

    @property
    def has_ensemble(self) -> bool:
        return bool(self.stages) and isinstance(self.stages[-1].defense, Ensemble)

    def _classify_with(self, timeout: float | None):
        def classify(x: torch.Tensor) -> torch.Tensor:  # [M, C, H, W] -> [M, K]
            arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
            return torch.from_numpy(np.asarray(self.backend.infer(arr, timeout=timeout), dtype=np.float32))

        return classify

    def _classify_features_with(self, timeout: float | None):
        def classify_features(x: torch.Tensor) -> tuple:  # [M, K], [M, D] | None[, {stage: [M]}]
            arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
            if self.fused is not None:
                logits, feats, scores = self.fused(arr)
                return (torch.from_numpy(logits), None if feats is None else torch.from_numpy(feats),
                        {stage: torch.from_numpy(v) for stage, v in scores.items()})
            logits, feats = self.backend.infer_with_features(arr, timeout=timeout)
            return (torch.from_numpy(np.asarray(logits, dtype=np.float32)),
                    None if feats is None else torch.from_numpy(np.asarray(feats, dtype=np.float32)))

        return classify_features

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def _model(self, timeout: float | None) -> DefendedModel:
        return DefendedModel(self.stages, self._classify_with(timeout), self.classifier, self.failure_policy,
                             classify_features=self._classify_features_with(timeout) if self.share_features else None,
                             max_fanout_items=self.max_fanout_items)

    def __call__(self, x: np.ndarray, timeout: float | None = None) -> PipelineResult:
        """``x`` ``[N, C, H, W]`` float32 (validated by the codec) -> the pipeline's result."""
        with torch.no_grad():
            return self._model(timeout)(torch.from_numpy(x), generator=self.generator())

    def prepare(self, x: np.ndarray) -> Callable[[float | None], PipelineResult]:
        """The detectors and purifiers on ``x`` now; returns ``finish(timeout)``, which classifies
        and gives what ``self(x, timeout)`` gives. The two halves may run in different threads
        (the batcher overlaps one batch's ``prepare`` with the previous batch's ``finish``);
        ``finish`` belongs to this runner, so a batch prepared before a reload finishes with the
        pipeline it started with. Without purifiers the shared pass would classify here, with no
        timeout: the server calls it only when :attr:`has_purifiers`."""
        generator = self.generator()
        with torch.no_grad():  # grad mode is per thread: each half sets its own
            front = self._model(None).front(torch.from_numpy(x), generator)

        def finish(timeout: float | None) -> PipelineResult:
            with torch.no_grad():
                return self._model(timeout).back(front, generator)

        return finish


def build_runner(cfg: PipelineConfig, bundle: Bundle, backend: Backend, classifier: Classifier | None) -> PipelineRunner:
    return PipelineRunner(
        stages=build_stages(cfg, bundle), backend=backend, classifier=classifier,
        failure_policy=cfg.failure_policy, seed=cfg.seed, max_fanout_items=cfg.max_fanout_items,
    )
