"""The one pipeline assembly: stage config + bundle -> the stages, and the runner that serves them.

The proxy (proxy/serve.py, proxy/reload.py) and the red team (``robustgate eval``, attacks/runner.py)
build their pipelines only here, so "measured on the pipeline the proxy runs" holds by
construction:

- :class:`StageConfig` / :class:`PipelineConfig`: the pydantic ``pipeline:`` section of the proxy's
  config file (the red team reads the same model from its own YAML shapes);
- :func:`build_stages`: each configured stage is ``defenses.base.build_from_bundle(kind, name,
  params, ...)``: when the bundle holds a fitted defense under the stage's name, its kind must
  match, its params are the base (the stage's ``params`` are merged over them), its artifact files
  (checksums verified by ``Bundle.load``) are loaded and its calibrated threshold is used unless the
  stage sets ``threshold``; a defense that runs a fitted model but has none in the bundle is refused
  at start. ``twin=True`` builds the red team's differentiable copies (``runtime: torch`` on every
  defense that has a ``runtime`` parameter; each defense's parity test ties the two); served on a
  CPU device, a stage whose own params name no ``runtime`` runs in its defense's
  ``served_runtime`` (MagNet: ONNX Runtime, fused into the backbone's session), else in what the
  bundle recorded;
- :class:`PipelineRunner`: one batch through the stages with a backend (the proxy's ONNX Runtime
  session or its upstream) as the classify step (torch <-> numpy at the edge), given the time left
  until the batch's latest client deadline (none when one of its requests has none;
  proxy/batcher.py).

Device: ``pipeline.device`` (``cpu | cuda | auto``; a stage's own ``device`` overrides it) is
resolved once (:func:`resolve_device`; ``auto`` = cuda when ``torch.cuda.is_available()``), each
stage is moved there with ``Defense.to``, and the runner hands the batch to the stages on the
pipeline's device. A stage that computes on the host whatever the setting (ONNX Runtime CPU
sessions, Pillow's JPEG codec) is named once in the log at build time, never per request. The
classify step stays where its backend runs (ONNX Runtime's provider: ``backend.onnxruntime.device``);
a backend that takes torch tensors (``Backend.accepts_tensors``: the torch twin,
proxy/backends/torch.py) gets the batch as it is, on the device, so that on a GPU the batch is
copied in once (from a pinned host buffer) and the results copied out once (:meth:`PipelineRunner._on_host`).

Randomness: every batch gets a fresh ``torch.Generator`` seeded from ``os.urandom`` (an attacker
cannot predict the noise), unless ``pipeline.seed`` is set (tests), then each batch is seeded with it.

Threads: ``robustgate serve`` calls :func:`pin_torch_threads` once at start. The pipeline's torch
work (input checks, score arithmetic, quantization) is small per batch, next to the ONNX Runtime
sessions that do the compute on their own thread pools; torch's OpenMP pool on cores shared with
those sessions (and with other processes) stalls at its barriers instead (measured:
bench/results/detect.proxy_cost.md). The Kubernetes sidecar sets OMP_NUM_THREADS=1 for the same
reason.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from robustgate.defenses.base import SERVED, Classifier, Defense, Detector, Ensemble, build_from_bundle
from robustgate.defenses.pipeline import (
    ACCEPTED, REJECTED, DefendedModel, PipelineResult, Stage, act, is_stateful, run_stateful, split_stages,
)

# the config models live apart, torch-free (defenses/config.py); re-exported for the assembly's callers
from robustgate.defenses.config import PipelineConfig, StageConfig  # noqa: F401

if TYPE_CHECKING:  # the backend interface lives with the transport; only its methods are used here
    from robustgate.proxy.backends.base import Backend

log = logging.getLogger("robustgate.assemble")


def resolve_device(device: str) -> str:
    """``cpu | cuda | auto`` -> ``cpu`` or ``cuda``; ValueError for cuda without a CUDA device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use device: cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return device


def host_only(defense: Defense) -> str | None:
    """Why ``defense`` computes on the host whatever its device (None: it follows ``Defense.to``)."""
    if getattr(defense, "runtime", None) == "onnx":
        return "runs in an ONNX Runtime CPU session (runtime: onnx)"
    reason = getattr(type(defense), "host_only", None)  # a defense may declare it (class attribute, str)
    if reason:
        return str(reason)
    if defense.kind == "jpeg":  # defenses/purify/jpeg.py encodes with Pillow
        return "encodes with Pillow on the host (the batch is copied there and back)"
    return None


StoreMap = dict  # stage name -> (the stage's store config, the HistoryStore built from it)


def stage_store(sc: StageConfig, bundle: Any | None, stores: StoreMap | None, where: str,
                store_service: str | None = None):
    """``(spec, store)`` for stateful stage ``sc``: the running store when ``stores`` holds one for
    this stage built from the same ``store:`` config for the same method and fitted artifacts (a
    reload keeps the histories and blocks), else a new one (``defenses.stateful.store.store_for``: a memory store of
    Blacklight holds ``top_k`` hashes per query; method knn keeps embeddings, in memory or Redis).
    ``store_service``: the socket of the replica's store service (a worker of ``server.workers`` > 1,
    defenses/stateful/remote.py): a ``kind: memory`` store is then the service's, shared by the workers."""
    from robustgate.defenses.stateful.remote import RemoteStore
    from robustgate.defenses.stateful.store import store_for, store_kind

    fitted = bundle.spec.defenses.get(sc.name) if bundle is not None else None
    params = {**(fitted.params if fitted is not None else {}), **sc.params}
    method = params.get("method", "blacklight")
    # what the remembered queries mean: the method, and for knn the encoder that embedded them (a
    # refitted encoder's embeddings are not comparable with the old one's)
    origin = method + "".join(f":{a.sha256}" for a in (fitted.files.values() if fitted is not None else ()))
    spec = dict(sc.store or {"kind": "memory"})
    old = (stores or {}).get(sc.name)
    if old is not None and old[0] == spec and getattr(old[1], "origin", "blacklight") == origin:
        return old
    if old is not None:
        log.warning("%s: store config changed from %s to %s (or the stage's method or fitted artifacts: %s -> %s); "
                    "the new store starts empty", where, old[0], spec, getattr(old[1], "origin", "blacklight"), origin)
    try:
        if store_service is not None and store_kind(spec) == "memory":
            store = RemoteStore(store_service, {"stage": sc.name, "method": method, "origin": origin, "spec": spec,
                                                "top_k": params.get("top_k", 20)})
        else:
            store = store_for(method, spec, params.get("top_k", 20), origin)
    except Exception as exc:  # noqa: BLE001 - a bad store config or an unreachable Redis refuses the pipeline
        raise ValueError(f"{where}: store: {exc}") from None
    store.origin = origin  # what the next reload compares on
    return spec, store


def build_stages(cfg: PipelineConfig, bundle: Any | None, twin: bool = False,
                 device: str | None = None, stores: StoreMap | None = None,
                 store_service: str | None = None) -> list[Stage]:
    """The configured stages, built, loaded and on their device; ValueError naming the stage on any
    problem. ``twin``: the red team's differentiable copies. ``device`` overrides ``cfg.device`` (a
    stage's own ``device`` still wins); ``bundle=None``: untrained defenses, no bundle (tests).
    ``stores``: the running pipeline's stateful stores (:attr:`PipelineRunner.stores`), handed to the
    rebuilt stages of the same name and store config (:func:`stage_store`); ``store_service``: the
    replica's shared store service, if any (:func:`stage_store`)."""
    default = device or cfg.device
    stages, on_host = [], []
    for i, sc in enumerate(cfg.stages):
        where = f"pipeline.stages.{i} ({sc.name})"
        params = dict(sc.params)
        if sc.kind == "stateful":
            params["store"] = stage_store(sc, bundle, stores, where, store_service)[1]
            if bundle is not None:
                params.setdefault("value_range", tuple(bundle.input.value_range))
        try:
            target = resolve_device(sc.device or default)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        # the twin differentiates in torch; served on the host, a defense runs in what it was
        # measured fastest in there (Defense.served_runtime) unless the stage names a runtime
        runtime = "torch" if twin else SERVED if target == "cpu" else None
        defense = build_from_bundle(sc.kind, sc.name, params, sc.threshold, bundle, where=where, runtime=runtime)
        if sc.kind == "stateful":
            defense.store_spec = dict(sc.store or {"kind": "memory"})  # what stage_store compares on reload
        defense.to(target)
        if target != "cpu" and (reason := host_only(defense)) is not None:
            on_host.append(f"{sc.name} ({reason})")
        stages.append(Stage(name=sc.name, defense=defense, action=sc.action, cooldown_s=sc.cooldown_s,
                            block_after=sc.block_after, block_window=sc.block_window))
    if on_host:  # once, at start: these stages do not follow the device setting
        log.warning("stages that compute on the host, not on %s: %s", resolve_device(default), "; ".join(on_host))
    return stages


def pin_torch_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Sets torch's intra-op threads to 1 for the proxy process, unless ``OMP_NUM_THREADS`` is set
    (torch then follows it); returns the thread count in effect. Process-wide: call it from the
    serving entry point only (module docstring, "Threads")."""
    if "OMP_NUM_THREADS" not in environ:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class _PinnedStaging:
    """A page-locked host buffer per thread for the batch's host->device copy (an asynchronous
    DMA from pinned memory, instead of the driver's extra staging copy from pageable memory). The
    buffer grows to the largest batch seen; an event recorded after each copy is waited on before
    the buffer is overwritten, so a thread never overwrites a copy still in flight."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.event = None

    def to_device(self, t: torch.Tensor, device: str) -> torch.Tensor:
        if not torch.cuda.is_available() or not str(device).startswith("cuda"):
            return t.to(device)
        n = t.numel()
        if self.event is not None:
            self.event.synchronize()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != t.dtype:
            self.buffer = torch.empty(n, dtype=t.dtype, pin_memory=True)
        host = self.buffer[:n].view(t.shape)
        host.copy_(t)
        out = host.to(device, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return out


_staging_local = threading.local()


def _staging() -> _PinnedStaging:
    if not hasattr(_staging_local, "staging"):
        _staging_local.staging = _PinnedStaging()
    return _staging_local.staging


@dataclass
class PipelineRunner:
    """Runs one batch through the stages with the backend as classifier (synchronous; call it
    from a worker thread). ``device``: where the batch meets the stages (resolved, ``cpu`` or
    ``cuda``); results come back on the host."""

    stages: list[Stage]
    backend: "Backend"
    classifier: Classifier | None
    failure_policy: str = "fail-closed"
    seed: int | None = None
    share_features: bool = True  # the shared classify pass (defenses/pipeline.py); False: as before
    max_fanout_items: int | None = None  # an ensemble's copies per backend call (pipeline.max_fanout_items)
    device: str = "cpu"
    store_service: str | None = None  # the replica's shared store service (stage_store); a reload keeps it

    def __post_init__(self):
        # validates the stage list once at start (the per-batch models reuse these stages)
        DefendedModel(self.stages, self._classify_with(None), self.classifier, self.failure_policy)
        self.fused = self._fuse()
        # whether the batch has a front half worth a thread of its own (:meth:`prepare`); asked per batch
        self.has_purifiers = bool(split_stages(self.stages)[1])
        self.fused_only = self._fused_only()
        # no stage at all (a forwarding or pass-through deployment): one backend call, every item accepted
        self.passthrough = (not self.stages and self.device == "cpu"
                            and not getattr(self.backend, "accepts_tensors", False))

    def _fuse(self):
        """The backend's fused pass (proxy/backends/fuse.py) for the detectors that offer a score
        graph and the stateful stages that offer an embedding graph (the k-NN encoder), when the
        pipeline has a shared pass (detectors and stateful stages only) and the backend can fuse
        (Backend.fused_pass); else None. A stage that fuses here runs in the backbone's session call."""
        detectors, purifiers, ensemble = split_stages(self.stages)
        stateful = [s for s in self.stages if is_stateful(s.defense)]
        if not (self.share_features and (detectors or stateful) and not purifiers and ensemble is None):
            return None
        models = {s.name: m for s in detectors if (m := s.defense.onnx_score_model()) is not None}
        models.update({s.name: m for s in stateful if (m := s.defense.onnx_embedding_model()) is not None})
        return self.backend.fused_pass(models) if models else None

    def _fused_only(self) -> bool:
        """Whether the whole pipeline is the fused pass (and stateful stages): every other stage a
        detector whose score the fused session computes and whose verdict is the base rule (score >
        threshold), on the CPU -- the shipped default, with or without the stateful stage. Such a
        batch runs through :meth:`_run_fused` instead of DefendedModel."""
        fused = set(self.fused.stages) if self.fused is not None else set()
        return self.device == "cpu" and self.fused is not None and all(
            is_stateful(s.defense) or (s.name in fused and isinstance(s.defense, Detector)
                                       and type(s.defense).is_adversarial is Detector.is_adversarial)
            for s in self.stages)

    def _run_fused(self, x: np.ndarray | torch.Tensor, clients: list[str] | None) -> PipelineResult:
        """DefendedModel's result for a pipeline that is only fused detectors (:meth:`_fused_only`):
        one session call, then each stage's threshold and action on its score (pipeline.act), in
        numpy -- without a per-batch model, generator and the torch round trips of the general path,
        a few dozen tensor calls that each release and retake the GIL while the event loop wants it.
        Equal to the general path's result (tests/defenses/test_pipeline_fused.py)."""
        arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else x
        n = arr.shape[0]
        if clients is not None and len(clients) != n:
            raise ValueError(f"clients must name one identity per item: {len(clients)} for {n} items")
        t0 = time.perf_counter()
        logits, _, fused = self.fused(arr)  # [N, K], -, {stage: [N] score or [N, d] stateful embedding}
        seconds = {"classify": time.perf_counter() - t0}
        verdict, reason = [ACCEPTED] * n, [None] * n
        scores, thresholds, failed, blocked = {}, {}, [], []
        for stage in self.stages:
            if is_stateful(stage.defense):
                continue
            s = fused[stage.name].reshape(n).astype(np.float32, copy=False)  # [N]
            scores[stage.name] = torch.from_numpy(s)
            if stage.defense.threshold is None:
                continue
            thresholds[stage.name] = t = float(stage.defense.threshold)
            act(stage, np.flatnonzero(s > t).tolist(), verdict, reason)  # float32 > t, as the tensor comparison
        if clients is not None and self.stateful_names:  # then the stateful stages, as DefendedModel's step 1b

            def fail(stage: Stage) -> None:  # DefendedModel's failure policy
                failed.append(stage.name)
                if self.failure_policy == "fail-closed":
                    for i in range(n):
                        if verdict[i] != REJECTED:
                            verdict[i], reason[i] = REJECTED, f"{stage.name} failed"

            # the array, not a tensor: each torch call releases the GIL, which the batch worker then waits to
            # take back from the busy event loop
            blocked = run_stateful(self.stages, arr, clients, verdict, reason, scores, thresholds, seconds, fail,
                                   embeddings=fused, checked=True)  # __call__: validated input
        return PipelineResult(logits=torch.from_numpy(logits), verdict=torch.tensor(verdict, dtype=torch.int64),
                              reason=reason, scores=scores, thresholds=thresholds, seconds=seconds,
                              failed_stages=failed, blocked=blocked)

    def _run_passthrough(self, x: np.ndarray | torch.Tensor, timeout: float | None) -> PipelineResult:
        """DefendedModel's result for a pipeline without stages (:attr:`passthrough`): the backend's
        logits, every item accepted -- without the per-batch model, generator and tensor round trips
        of the general path. Equal to it (tests/defenses/test_pipeline_fused.py)."""
        arr = _host(x) if isinstance(x, torch.Tensor) else np.ascontiguousarray(x, dtype=np.float32)
        n = arr.shape[0]
        t0 = time.perf_counter()
        logits = np.asarray(self.backend.infer(arr, timeout=timeout), dtype=np.float32)
        seconds = {"classify": time.perf_counter() - t0}
        return PipelineResult(logits=torch.from_numpy(logits), verdict=torch.zeros(n, dtype=torch.int64),
                              reason=[None] * n, seconds=seconds)

    @property
    def detector_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if isinstance(s.defense, Detector))

    @cached_property  # asked per call on the event loop; a runner's stages never change
    def stateful_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if is_stateful(s.defense))

    @property
    def stores(self) -> StoreMap:
        """The stateful stages' stores by stage name: ``(store config, HistoryStore)``; a reload hands
        them to the rebuilt pipeline (proxy/reload.py)."""
        return {s.name: (s.defense.store_spec, s.defense.store) for s in self.stages if is_stateful(s.defense)}

    @property
    def has_ensemble(self) -> bool:
        return bool(self.stages) and isinstance(self.stages[-1].defense, Ensemble)

    def _classify_with(self, timeout: float | None):
        if getattr(self.backend, "accepts_tensors", False):  # a torch backend: no host round trip
            def classify_tensor(x: torch.Tensor) -> torch.Tensor:  # [M, C, H, W] -> [M, K] on x's device
                return self.backend.infer_tensor(x).to(x.device)

            return classify_tensor

        def classify(x: torch.Tensor) -> torch.Tensor:  # [M, C, H, W] -> [M, K] on x's device
            logits = np.asarray(self.backend.infer(_host(x), timeout=timeout), dtype=np.float32)
            return torch.from_numpy(logits).to(x.device)

        return classify

    def _classify_features_with(self, timeout: float | None):
        if self.fused is None and getattr(self.backend, "accepts_tensors", False):
            def classify_features_tensor(x: torch.Tensor) -> tuple:  # [M, K], [M, D] | None on x's device
                logits, feats = self.backend.infer_with_features_tensor(x)
                return logits.to(x.device), None if feats is None else feats.to(x.device)

            return classify_features_tensor

        def classify_features(x: torch.Tensor) -> tuple:  # [M, K], [M, D] | None[, {stage: [M]}]
            arr = _host(x)

            def back(a):
                return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float32)).to(x.device)

            if self.fused is not None:
                logits, feats, scores = self.fused(arr)
                return back(logits), back(feats), {stage: back(v) for stage, v in scores.items()}
            logits, feats = self.backend.infer_with_features(arr, timeout=timeout)
            return back(logits), back(feats)

        return classify_features

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        # on the pipeline's device: the stages draw their noise where their batch is (torch refuses a
        # CPU generator for CUDA tensors); a stage that overrides the device to the CPU in a CUDA
        # pipeline therefore cannot draw from it
        return torch.Generator(device=self.device).manual_seed(seed)

    def _model(self, timeout: float | None) -> DefendedModel:
        return DefendedModel(self.stages, self._classify_with(timeout), self.classifier, self.failure_policy,
                             classify_features=self._classify_features_with(timeout) if self.share_features else None,
                             max_fanout_items=self.max_fanout_items)

    def _input(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x.detach()
        if self.device == "cpu" or t.device.type != "cpu":
            return t if self.device == "cpu" else t.to(self.device)
        return _staging().to_device(t, self.device)  # one host->device copy, from a pinned buffer

    def _on_host(self, result: PipelineResult) -> PipelineResult:
        """The result's tensors on the host with one device->host copy: logits, verdict, scores and
        radius are packed into one float32 device tensor first (verdicts are small integers, exact
        in float32)."""
        if self.device == "cpu":
            return result
        n = result.verdict.shape[0]
        parts = [result.logits.float().reshape(n, -1), result.verdict.float().reshape(n, 1),
                 *(v.float().reshape(n, 1) for v in result.scores.values()),
                 *(() if result.radius is None else (result.radius.float().reshape(n, 1),))]
        packed = torch.cat([p.to(self.device) for p in parts], dim=1).cpu()  # [N, K + 1 + S (+ 1)]
        k = parts[0].shape[1]
        logits, verdict, rest = packed[:, :k], packed[:, k].to(result.verdict.dtype), packed[:, k + 1:]
        result.logits, result.verdict = logits.to(result.logits.dtype), verdict
        result.scores = {name: rest[:, i].to(v.dtype) for i, (name, v) in enumerate(result.scores.items())}
        if result.radius is not None:
            result.radius = rest[:, -1].to(result.radius.dtype)
        return result

    def __call__(self, x: np.ndarray | torch.Tensor, timeout: float | None = None,
                 clients: list[str] | None = None) -> PipelineResult:
        """``x`` ``[N, C, H, W]`` float32 (validated by the codec) -> the pipeline's result (on the host).
        ``clients``: one identity per item (proxy/identity.py) for the stateful stages; None skips them."""
        if self.fused_only:
            return self._run_fused(x, clients)
        if self.passthrough:
            return self._run_passthrough(x, timeout)
        with torch.no_grad():
            return self._on_host(self._model(timeout)(self._input(x), generator=self.generator(), clients=clients))

    def prepare(self, x: np.ndarray, clients: list[str] | None = None) -> Callable[[float | None], PipelineResult]:
        """The detectors and purifiers on ``x`` now; returns ``finish(timeout)``, which classifies
        and gives what ``self(x, timeout)`` gives. The two halves may run in different threads
        (the batcher overlaps one batch's ``prepare`` with the previous batch's ``finish``);
        ``finish`` belongs to this runner, so a batch prepared before a reload finishes with the
        pipeline it started with. Without purifiers the shared pass would classify here, with no
        timeout: the server calls it only when :attr:`has_purifiers`."""
        generator = self.generator()
        with torch.no_grad():  # grad mode is per thread: each half sets its own
            front = self._model(None).front(self._input(x), generator, clients)

        def finish(timeout: float | None) -> PipelineResult:
            with torch.no_grad():
                return self._on_host(self._model(timeout).back(front, generator))

        return finish


def build_runner(cfg: PipelineConfig, bundle: Any, backend: "Backend", classifier: Classifier | None,
                 device: str | None = None, stores: StoreMap | None = None,
                 store_service: str | None = None) -> PipelineRunner:
    """The served pipeline of ``cfg``: its stages (:func:`build_stages`) in a :class:`PipelineRunner`
    on ``backend``. ``device`` overrides ``cfg.device``; ``stores``: the running pipeline's stateful
    stores, kept (a reload); ``store_service``: the replica's shared store service (a worker's)."""
    return PipelineRunner(
        stages=build_stages(cfg, bundle, device=device, stores=stores, store_service=store_service),
        backend=backend, classifier=classifier, failure_policy=cfg.failure_policy, seed=cfg.seed,
        max_fanout_items=cfg.max_fanout_items, device=resolve_device(device or cfg.device),
        store_service=store_service,
    )
