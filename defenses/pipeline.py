"""The defended model: detect -> purify -> classify -> ensemble, per batch, with per-item verdicts.

The proxy runs this with a backend (in-process ONNX Runtime or an upstream V2 server) as
``classify``; the red team runs the very same object with the differentiable torch twin, so
what is attacked is what is served.

Semantics (DESIGN.md, "The defense pipeline"):

1. Detectors score the **raw** input ``x``, wherever they stand in the stage list. An item whose
   score exceeds a detector's calibrated threshold gets that detector's action: ``reject``
   (verdict REJECTED), ``flag`` (FLAGGED unless rejected elsewhere) or ``log`` (score only).
2. Purifiers transform the input in the order the config gives.
3. The classifier runs once on the purified batch, or -- when the last stage is an ensemble --
   once on the ``N*T`` expanded copies (one batched backend call; consecutive calls of at most
   ``max_fanout_items`` copies when there are more), then ``aggregate``.
   An ensemble abstention is a rejection whose reason is the ensemble's stage name.
   **Shared pass**: when the pipeline has no purifier and no ensemble, the classifier's input is
   the raw ``x`` the detectors score; given ``classify_features`` (the proxy's ONNX Runtime
   backend, whose graph also outputs the backbone's late features) the classify pass runs first,
   once, and detectors that query the backbone on ``x`` (SafetyNet's features, MagNet-JSD's
   logits on ``x``) read its outputs instead of running the backbone again. Same scores, same
   verdicts; without ``classify_features`` (the red team's torch twin, upstream backends) the
   detectors query ``classifier`` as before. **Fused scores**: ``classify_features`` may also
   return scores it computed in the same pass, by stage name (the proxy fuses MagNet's
   reconstruction error into the backbone's ONNX graph, proxy/backends/fuse.py); those detectors'
   ``score`` is not called, their time is part of ``classify``'s, and they fail with it.
4. Stateful stages (defenses/stateful: ``role`` detector, ``observe(client, x)`` instead of
   ``score(x)``) see the stream: given ``clients`` (one identity per item, proxy/identity.py), each
   client's items of the batch are observed together, clients in order of first appearance (the
   arrival order); their scores join ``scores`` and their threshold acts like a detector's, with
   one more action, ``block``: the item is rejected, and once its client has ``block_after``
   detections among its last ``block_window`` remembered queries the client is blocked for the
   stage's ``cooldown_s`` (``store.block``); an item of a client blocked already is not observed, it is
   rejected with ``blocked[i]`` = the block's end (the proxy answers RESOURCE_EXHAUSTED with a
   retry hint). Without ``clients`` (the red team's white-box runs, eval) stateful stages are
   skipped: a single batch has no stream, and nothing measured on one may change.
5. A stage that raises follows the failure policy: ``fail-closed`` rejects every item of the
   batch (reason ``"<stage> failed"``); ``fail-open`` skips the stage and records the failure.
   The classifier failing is never absorbed here: it propagates to the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from robustgate.defenses.base import Action, Classifier, Defense, Detector, Ensemble, Purifier
from robustgate.defenses.stateful.base import StatefulDetector

ACCEPTED, FLAGGED, REJECTED = 0, 1, 2
VERDICT_NAMES = ("accepted", "flagged", "rejected")
FailurePolicy = Literal["fail-closed", "fail-open"]


@dataclass(frozen=True)
class Stage:
    """One configured pipeline stage: a unique ``name`` (used in verdicts and metrics), the
    defense, and for detectors the action taken when the threshold is exceeded."""

    name: str
    defense: Defense
    action: Action = "reject"
    cooldown_s: float = 0.0  # action block: how long a detected client stays blocked
    block_after: int = 1  # action block: detections that block the client ...
    block_window: int | None = None  # ... among its last block_window remembered queries (None: until ttl_s)


@dataclass
class PipelineResult:
    """What one batch of ``N`` items produced.

    ``logits`` ``[N, K]``: the classifier's logits, or with an ensemble the log of its averaged
    probabilities (so ``softmax(logits)`` is always the answer's distribution). ``verdict``
    ``[N]`` int64 in {ACCEPTED, FLAGGED, REJECTED}; ``reason[i]`` names the stage that flagged or
    rejected item ``i`` (None when accepted); ``scores`` maps detector stage -> ``[N]``;
    ``radius`` ``[N]`` certified L2 radius (NaN where none) when the ensemble certifies.
    ``seconds`` maps stage name (and ``"classify"``) -> wall time.
    """

    logits: torch.Tensor
    verdict: torch.Tensor
    reason: list[str | None]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    radius: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    failed_stages: list[str] = field(default_factory=list)
    # per item: when its client's block ends (epoch seconds), None when not blocked; [] when no item is
    blocked: list[float | None] = field(default_factory=list)


@dataclass
class Front:
    """A batch after :meth:`DefendedModel.front`: the purified input, the verdicts and scores so
    far, and the logits when the shared pass already classified it (else None)."""

    purified: torch.Tensor
    verdict: torch.Tensor
    reason: list[str | None]
    scores: dict[str, torch.Tensor]
    thresholds: dict[str, float]
    seconds: dict[str, float]
    failed: list[str]
    logits: torch.Tensor | None = None
    blocked: list[float | None] = field(default_factory=list)


def act(stage: Stage, hits: list[int], verdict, reason: list[str | None]) -> None:
    """A detector stage's action on the items ``hits`` (score over its threshold): ``reject`` makes
    them REJECTED (the first rejecting stage is the reason), ``flag`` FLAGGED unless rejected or
    flagged already, ``log`` nothing. ``verdict``: ``[N]`` codes, a tensor or a list, updated in place."""
    for i in hits:
        if stage.action == "reject" and verdict[i] != REJECTED:
            verdict[i], reason[i] = REJECTED, stage.name
        elif stage.action == "flag" and verdict[i] == ACCEPTED:
            verdict[i], reason[i] = FLAGGED, stage.name


def is_stateful(defense: Defense) -> bool:
    """A stateful detector: scores a client's stream with ``observe`` (defenses/stateful/base.py)."""
    return defense.role == "detector" and hasattr(defense, "observe") and not isinstance(defense, Detector)


class SharedPass:
    """A :class:`~robustgate.defenses.base.Classifier` view of one batch's classify pass: asked
    about the very tensor ``x`` that was classified (identity, not equality), it answers from the
    pass's ``logits`` ``[N, K]`` and ``features`` ``[N, D]`` (None when the backend gave none);
    asked about anything else (MagNet's ``AE(x)``), it asks ``classifier``."""

    def __init__(self, classifier: Classifier | None, x: torch.Tensor, logits: torch.Tensor,
                 features: torch.Tensor | None):
        self.classifier, self.x, self._logits, self._features = classifier, x, logits, features

    def _fallback(self) -> Classifier:
        if self.classifier is None:
            raise ValueError("this detector queries the backbone but the pipeline has no local classifier")
        return self.classifier

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits if x is self.x else self._fallback().logits(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x is self.x and self._features is not None:
            return self._features
        return self._fallback().features(x)


def validate_stages(stages: list[Stage]) -> None:
    """Raises ``ValueError`` for a stage list the runner cannot execute."""
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"pipeline stage names must be unique; repeated: {', '.join(dupes)}")
    for i, s in enumerate(stages):
        if isinstance(s.defense, Ensemble) and i != len(stages) - 1:
            raise ValueError(f"ensemble stage {s.name!r} must be the last stage (it feeds the classifier)")
        if s.defense.role == "detector" and getattr(s.defense, "threshold", None) is None and s.action != "log":
            raise ValueError(f"detector stage {s.name!r} has no calibrated threshold; fit it or use action: log")
        if s.action == "block" and not is_stateful(s.defense):
            raise ValueError(f"stage {s.name!r}: action block needs a stateful stage (it blocks a client, not an item)")
        if not isinstance(s.defense, (Detector, Purifier, Ensemble)) and not is_stateful(s.defense):
            raise ValueError(f"stage {s.name!r}: {type(s.defense).__name__} is not a detector, purifier or ensemble")


def split_stages(stages: list[Stage]) -> tuple[list[Stage], list[Stage], Stage | None]:
    """``(detectors, purifiers, ensemble)`` of a stage list, each in config order; the ensemble
    is the last stage when it is one (``validate_stages`` refuses it anywhere else)."""
    detectors = [s for s in stages if isinstance(s.defense, Detector)]
    purifiers = [s for s in stages if isinstance(s.defense, Purifier)]
    last = stages[-1] if stages else None
    return detectors, purifiers, (last if last is not None and isinstance(last.defense, Ensemble) else None)


class DefendedModel:
    """Runs the configured stages around ``classify``.

    Args:
        stages: in config order (see module docstring); validated here.
        classify: ``[M, C, H, W]`` float32 -> ``[M, K]`` logits; the backend (proxy) or the torch
            twin (red team). Called exactly once per batch.
        classifier: the local backbone view detectors may query (MagNet, SafetyNet).
        failure_policy: ``fail-closed`` (default) or ``fail-open``.
        classify_features: optional ``[M, C, H, W]`` -> (``[M, K]`` logits, ``[M, D]`` features or
            None[, stage name -> ``[M]`` fused scores, or a stateful stage's ``[M, d]`` embedding]) in
            one pass; used instead of ``classify`` for the shared pass (module docstring).
        max_fanout_items: the most copies an ensemble sends to ``classify`` in one call: a larger
            fan-out (smoothing with n = 1,000 on a batch of 64 is 68,000 images, gigabytes of
            activations) is classified in consecutive chunks of at most this many (None: one call).
    """

    def __init__(
        self,
        stages: list[Stage],
        classify: Callable[[torch.Tensor], torch.Tensor],
        classifier: Classifier | None = None,
        failure_policy: FailurePolicy = "fail-closed",
        classify_features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        max_fanout_items: int | None = None,
    ):
        if failure_policy not in ("fail-closed", "fail-open"):
            raise ValueError(f"failure_policy must be 'fail-closed' or 'fail-open', got {failure_policy!r}")
        if max_fanout_items is not None and max_fanout_items < 1:
            raise ValueError(f"max_fanout_items must be >= 1 or None, got {max_fanout_items!r}")
        self.max_fanout_items = max_fanout_items
        validate_stages(stages)
        self.stages = list(stages)
        self.classify = classify
        self.classifier = classifier
        self.failure_policy = failure_policy
        self.classify_features = classify_features

    @property
    def detectors(self) -> list[Stage]:
        return split_stages(self.stages)[0]

    @property
    def purifiers(self) -> list[Stage]:
        return split_stages(self.stages)[1]

    @property
    def ensemble(self) -> Stage | None:
        return split_stages(self.stages)[2]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 clients: list[str] | None = None) -> PipelineResult:
        """Runs the pipeline on ``x`` ``[N, C, H, W]`` (already validated by the caller); ``clients``:
        one identity per item for the stateful stages (module docstring, step 4)."""
        return self.back(self.front(x, generator, clients), generator)

    def front(self, x: torch.Tensor, generator: torch.Generator | None = None,
              clients: list[str] | None = None) -> Front:
        """Steps 0-2 (the shared pass, the detectors, the purifiers) on ``x`` ``[N, C, H, W]``;
        :meth:`back` finishes the batch. The proxy runs the two halves in different threads so
        that one batch's purifiers overlap the previous batch's classify (proxy/batcher.py);
        ``back(front(x, g), g)`` is exactly ``self(x, g)``."""
        n = x.shape[0]
        verdict = torch.full((n,), ACCEPTED, dtype=torch.int64)
        reason: list[str | None] = [None] * n
        scores: dict[str, torch.Tensor] = {}
        thresholds: dict[str, float] = {}
        seconds: dict[str, float] = {}
        failed: list[str] = []
        blocked: list[float | None] = []

        def _fail(stage: Stage) -> None:
            failed.append(stage.name)
            if self.failure_policy == "fail-closed":
                for i in range(n):
                    if verdict[i] != REJECTED:
                        verdict[i] = REJECTED
                        reason[i] = f"{stage.name} failed"

        # 0. shared pass: classify the raw input first when it is what the classifier sees anyway
        logits, classifier, fused = None, self.classifier, {}
        detectors, purifiers, ens_stage = split_stages(self.stages)
        if self.classify_features is not None and detectors and not purifiers and ens_stage is None:
            t0 = time.perf_counter()
            logits, feats, *more = self.classify_features(x)  # [N, K], [N, D] or None[, {stage: [N]}]
            seconds["classify"] = time.perf_counter() - t0
            classifier = SharedPass(self.classifier, x, logits, feats)
            fused = more[0] if more else {}

        # 1. detectors on the raw input
        for stage in detectors:
            det: Detector = stage.defense  # type: ignore[assignment]
            if stage.name in fused:  # computed in the shared pass (its time is classify's)
                s = fused[stage.name].detach().reshape(n).float()
            else:
                t0 = time.perf_counter()
                try:
                    s = det.score(x, classifier).detach().reshape(n).float()
                except Exception:  # noqa: BLE001 - a failing stage follows the failure policy, recorded by name
                    seconds[stage.name] = time.perf_counter() - t0
                    _fail(stage)
                    continue
                seconds[stage.name] = time.perf_counter() - t0
            scores[stage.name] = s
            if det.threshold is None:
                continue
            thresholds[stage.name] = float(det.threshold)
            act(stage, torch.nonzero(det.is_adversarial(s)).flatten().tolist(), verdict, reason)

        # 1b. stateful stages on the raw input, per client in arrival order
        if clients is not None:
            blocked = run_stateful(self.stages, x, clients, verdict, reason, scores, thresholds, seconds, _fail,
                                   embeddings=fused)  # a stateful stage's embedding may be among the fused outputs

        # 2. purifiers in order
        h = x
        for stage in purifiers:
            t0 = time.perf_counter()
            try:
                h = stage.defense.purify(h, generator)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - see failure policy
                _fail(stage)
            seconds[stage.name] = time.perf_counter() - t0
        return Front(purified=h, verdict=verdict, reason=reason, scores=scores, thresholds=thresholds,
                     seconds=seconds, failed=failed, logits=logits, blocked=blocked)

    def back(self, front: Front, generator: torch.Generator | None = None) -> PipelineResult:
        """Step 3 (classify, the ensemble) and the result, after :meth:`front`."""
        h, logits, verdict, reason, seconds = front.purified, front.logits, front.verdict, front.reason, front.seconds
        ens_stage = split_stages(self.stages)[2]
        # 3. classify (fanned out by the ensemble when there is one)
        radius = None
        if logits is not None:
            pass  # classified in the shared pass (step 0)
        elif ens_stage is None:
            t0 = time.perf_counter()
            logits = self.classify(h)
            seconds["classify"] = time.perf_counter() - t0
        else:
            ens: Ensemble = ens_stage.defense  # type: ignore[assignment]
            t0 = time.perf_counter()
            copies = ens.expand(h, generator)  # [N*T, C, H, W]
            t1 = time.perf_counter()
            step = self.max_fanout_items
            if step is None or copies.shape[0] <= step:
                fanned = self.classify(copies)  # [N*T, K], one backend call
            else:  # one backend call per chunk of at most max_fanout_items copies
                fanned = torch.cat([self.classify(copies[i:i + step]) for i in range(0, copies.shape[0], step)])
            t2 = time.perf_counter()
            result = ens.aggregate(fanned)
            seconds["classify"] = t2 - t1
            seconds[ens_stage.name] = (t1 - t0) + (time.perf_counter() - t2)
            logits = torch.log(result.probs.clamp_min(1e-12))
            radius = result.radius
            for i in torch.nonzero(result.abstain).flatten().tolist():
                if verdict[i] != REJECTED:
                    verdict[i], reason[i] = REJECTED, ens_stage.name

        return PipelineResult(
            logits=logits, verdict=verdict, reason=reason, scores=front.scores, thresholds=front.thresholds,
            radius=radius, seconds=seconds, failed_stages=front.failed, blocked=front.blocked,
        )


def run_stateful(stages: Sequence[Stage], x: torch.Tensor | np.ndarray, clients: list[str], verdict,
                 reason: list[str | None],
                 scores: dict, thresholds: dict, seconds: dict, fail: Callable[[Stage], None],
                 embeddings: dict | None = None, checked: bool = False) -> list[float | None]:
    """Step 1b of the module docstring, shared by :class:`DefendedModel` and the proxy's fused path
    (defenses/assemble.py ``PipelineRunner._run_fused``): every stateful stage of ``stages`` on
    ``x`` ``[N, C, H, W]`` (a tensor, or the fused path's float32 array: the stage then calls no torch
    function unless it encodes ``x`` itself) for ``clients`` ``[N]``, in order; updates ``verdict`` (codes, tensor or
    list), ``reason``, ``scores``, ``thresholds`` and ``seconds`` in place; a stage that raises
    goes to ``fail`` (the failure policy). ``embeddings``: stage name -> ``[N, d]`` computed for
    ``x`` in the backbone's fused pass (``StatefulDetector.onnx_embedding_model``); a stage found
    there does not compute its own. ``checked``: ``x`` was validated already (StatefulDetector.encode).
    Returns ``blocked`` (per item the end of its client's block, ``[]`` when none is)."""
    n = x.shape[0]
    if len(clients) != n:
        raise ValueError(f"clients must name one identity per item: {len(clients)} for {n} items")
    blocked: list[float | None] = []
    for stage in stages:
        if not is_stateful(stage.defense):
            continue
        t0 = time.perf_counter()
        try:
            s, ends = observe_clients(stage, x, clients, (embeddings or {}).get(stage.name), checked)
        except Exception:  # noqa: BLE001 - a failing store (Redis down) follows the failure policy
            seconds[stage.name] = time.perf_counter() - t0
            fail(stage)
            continue
        seconds[stage.name] = time.perf_counter() - t0
        scores[stage.name] = torch.from_numpy(s)
        if any(e is not None for e in ends):
            blocked = blocked or [None] * n
            for i, end in enumerate(ends):
                if end is not None:
                    blocked[i] = end if blocked[i] is None else max(blocked[i], end)
                    verdict[i], reason[i] = REJECTED, stage.name
        det = stage.defense
        if det.threshold is None:
            continue
        thresholds[stage.name] = float(det.threshold)
        if type(det).is_adversarial is StatefulDetector.is_adversarial:  # the base rule, in numpy: float32 > t
            hits = np.flatnonzero(s > det.threshold).tolist()  # as the tensor comparison
        else:
            hits = torch.nonzero(det.is_adversarial(scores[stage.name])).flatten().tolist()
        for i in hits:
            if stage.action in ("reject", "block") and verdict[i] != REJECTED:
                verdict[i], reason[i] = REJECTED, stage.name
            elif stage.action == "flag" and verdict[i] == ACCEPTED:
                verdict[i], reason[i] = FLAGGED, stage.name
    return blocked


def observe_clients(stage: Stage, x: torch.Tensor | np.ndarray, clients: list[str],
                    embedding=None, checked: bool = False) -> tuple[np.ndarray, list[float | None]]:
    """One stateful stage on a batch: ``x`` ``[N, C, H, W]`` (tensor or float32 array), ``clients``
    ``[N]`` -> float32 scores ``[N]`` and
    per item the end of its client's block (None: not blocked). ``embedding`` ``[N, d]`` (numpy or
    tensor): the stage's embedding of ``x`` from the fused pass, else None (the stage computes it);
    ``checked``: ``x`` was validated already (StatefulDetector.encode). The items are encoded
    (fingerprinted) in one call, and the clients' blocks checked and their items observed in one
    call (``StatefulDetector.observe_live_rows``: one round trip to a store shared by the workers),
    each client's rows in order, clients in order of first appearance; a blocked client's items are
    not observed (score 0); with action ``block`` each item over the threshold is rejected and counts as a detection of
    its client (``store.add_detections``); at ``stage.block_after`` detections the client is blocked
    for ``stage.cooldown_s`` from now, and all its items of this batch answer as blocked."""
    det = stage.defense
    n = x.shape[0]
    scores = np.zeros(n, dtype=np.float32)
    ends: list[float | None] = [None] * n
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(clients):
        groups.setdefault(c, []).append(i)
    now = time.time()
    if embedding is not None and isinstance(embedding, torch.Tensor):
        embedding = embedding.detach().cpu().numpy()
    if isinstance(x, np.ndarray) and (embedding is None or not checked):  # the stage checks or encodes x (torch)
        x = torch.from_numpy(x)
    encoded = det.encode(x, embedding, checked)  # every item (a blocked client's too: its block is checked below,
    # in the same store call as the others' observation)
    order = [i for idx in groups.values() for i in idx]  # the items by group
    if order != list(range(n)):
        encoded = tuple(a[order] for a in encoded)
    parts, at = [], 0
    for client, idx in groups.items():
        end = at + len(idx)
        parts.append((client, tuple([a[at:end] for a in encoded])))
        at = end
    # every client's history in one call: as one after the other (each client appears once per batch,
    # so a block decided below cannot change another client's scores); the bookkeeping in numpy, once
    # per batch (a few torch calls per client cost more than the stage itself on small batches)
    group_ends, got = det.observe_live_rows(parts, now)  # got: [items of the unblocked clients] float32
    live: list[tuple[str, list[int]]] = []
    for (client, idx), until in zip(groups.items(), group_ends):
        if until is None:
            live.append((client, idx))
        else:
            for i in idx:
                ends[i] = until
    if not live:
        return scores, ends
    scores[[i for _, idx in live for i in idx]] = got
    store = det.store
    if stage.action == "block" and det.threshold is not None and (got > det.threshold).any():
        hits = np.add.reduceat((got > det.threshold).astype(np.int64), np.cumsum([0] + [len(i) for _, i in live[:-1]]))
        for (client, idx), h in zip(live, hits.tolist()):
            if h and store.add_detections(client, h, now, stage.block_window) >= stage.block_after:
                store.block(client, now + stage.cooldown_s)
                for i in idx:
                    ends[i] = now + stage.cooldown_s
    return scores, ends
