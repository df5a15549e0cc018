"""The verdict rules: what a batch result means for one request's answer (COMMON.md "Rejection
status"; docs/PROTOCOL.md).

- request mode (default): a request holding a rejected item fails with PERMISSION_DENIED,
  details ``rejected by robustgate: item <i> stage <name>`` and trailing metadata
  ``robustgate-verdict=rejected``, ``robustgate-stage``, ``robustgate-item`` (first rejected
  item); the score and threshold (`` score <s> threshold <t>``, ``robustgate-score``,
  ``robustgate-threshold``) only with ``server.explain`` -- they are an evasion oracle, so by
  default they go to the log and the metrics only;
- item mode: every item is answered; rejected items' logits are NaN, and the verdict outputs
  (per-item verdict, each detector's score, the certified radius) travel beside them.

- a blocked client (a stateful stage's ``block`` action, defenses/pipeline.py) is answered
  RESOURCE_EXHAUSTED ``client refused by robustgate: retry after <s> s; stage <name>``, trailing
  metadata ``robustgate-verdict=blocked``, ``robustgate-stage``, ``retry-after-ms`` (:func:`blocked`),
  in both modes: the refusal is of the client, not of an item. RESOURCE_EXHAUSTED rather than
  PERMISSION_DENIED because clients, gRPC retry policies and gateways already read it as "back off
  and retry later", which is exactly what a cool-down asks, and a benign client caught by mistake
  recovers by itself; PERMISSION_DENIED reads as "never retry" and would turn a false positive into
  an outage for that client;
- an accepted item's logits pass through the model's output policy (:func:`apply_outputs`).

Every verdict and rejecting stage is counted in the metrics here; the transport (proxy/server.py)
only encodes what :func:`verdict_answer` gives it.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from robustgate.defenses.pipeline import REJECTED, PipelineResult
from robustgate.models.output_kind import to_probabilities
from robustgate.proxy.batcher import slice_result
from robustgate.proxy.codec import VERDICT_NAMES, Answer
from robustgate.proxy.metrics import Metrics

log = logging.getLogger("robustgate.proxy")

_OUTCOME_BY_CODE = {
    "INVALID_ARGUMENT": "invalid",
    "NOT_FOUND": "not_found",
    "RESOURCE_EXHAUSTED": "resource_exhausted",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
}


@dataclass
class _Failure:
    code: grpc.StatusCode
    message: str
    outcome: str
    metadata: tuple[tuple[str, str], ...] = ()


def rejection(result: PipelineResult, i: int, explain: bool = False) -> _Failure:
    """The PERMISSION_DENIED answer for rejected item ``i`` (request mode). The score and threshold
    are logged always and answered only with ``explain`` (server.explain): a client that sees them
    can walk an input under the threshold (docs/OPERATIONS.md, "Threat model")."""
    stage = result.reason[i] or "unknown"
    base = stage[: -len(" failed")] if stage.endswith(" failed") else stage
    score = result.scores.get(base)
    s = float(score[i]) if score is not None else math.nan
    t = result.thresholds.get(base, math.nan)
    log.info("rejected: item %d stage %s score %.6g threshold %.6g", i, stage, s, t)
    message = f"rejected by robustgate: item {i} stage {stage}"
    metadata = (("robustgate-verdict", "rejected"), ("robustgate-stage", stage), ("robustgate-item", str(i)))
    if explain:
        message += f" score {s:.6g} threshold {t:.6g}"
        metadata += (("robustgate-score", repr(s)), ("robustgate-threshold", repr(t)))
    return _Failure(grpc.StatusCode.PERMISSION_DENIED, message, "rejected", metadata)


def _host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array (shared memory for a host tensor without autograd): one torch call, not
    ``detach().cpu().numpy()``'s three -- each releases the GIL, and the batch worker then waits to
    take it back from the busy event loop."""
    return t.numpy() if t.is_cpu and not t.requires_grad else t.detach().cpu().numpy()


@dataclass
class BatchAnswer:
    """One batch's :class:`PipelineResult` as numpy, made once per batch in its worker thread
    (:meth:`of`); a request's answer is a row range ``[a, b)`` of it (the batcher hands each request
    ``(batch, a, b)``), so the event loop converts no tensors and builds no per-request result."""

    result: PipelineResult  # the batch's own (rejection details, blocks, stage times)
    logits: np.ndarray  # [M, K] float32, the rows of rejected items NaN
    verdict: np.ndarray  # [M] int64
    codes: list[int]  # verdict as Python ints
    names: list[str]  # VERDICT_NAMES[verdict] per item
    reasons: list[str]  # the stage that flagged or rejected each item, "" when accepted
    scores: dict[str, np.ndarray]  # detector stage -> [M] float32
    radius: np.ndarray | None  # [M]
    any_rejected: bool
    any_blocked: bool

    @classmethod
    def of(cls, result: PipelineResult) -> "BatchAnswer":
        verdict = result.verdict.numpy()  # [M] (on the host: the runner's result is)
        codes = verdict.tolist()
        rejected = REJECTED in codes
        logits = _host(result.logits).astype(np.float32, copy=True)  # [M, K]
        if rejected:
            logits[verdict == REJECTED] = np.nan
        return cls(
            result=result, logits=logits, verdict=verdict, codes=codes, names=[VERDICT_NAMES[v] for v in codes],
            reasons=[r or "" for r in result.reason],
            scores={k: _host(v) for k, v in result.scores.items()},
            radius=None if result.radius is None else _host(result.radius),
            any_rejected=rejected, any_blocked=any(e is not None for e in result.blocked),
        )

    def rows(self, a: int, b: int) -> PipelineResult:
        """Rows ``a:b`` of the batch's PipelineResult (the rare paths: a rejection, a block)."""
        return slice_result(self.result, a, b)


def verdict_answer(batch: BatchAnswer, a: int, b: int, verdict_mode: str, metrics: Metrics,
                   explain: bool = False) -> tuple[_Failure | None, Answer | None]:
    """One request's share (rows ``a:b``) of a batch -> (the rejection, None) in request mode when
    an item was rejected, else (None, the answer to encode: logits ``[N, K]`` with rejected rows NaN,
    the verdicts ``[N]``, reasons, detector scores, radius). Counts items by verdict and rejections by stage in ``metrics``."""
    codes = batch.codes[a:b]
    if b - a == 1:
        metrics.verdict_items(VERDICT_NAMES[codes[0]]).inc()
    else:
        for v in set(codes):  # one increment per verdict, not per item (~3.5 us each on the event loop)
            metrics.verdict_items(VERDICT_NAMES[v]).inc(codes.count(v))
    if batch.any_rejected and REJECTED in codes:
        rows = batch.rows(a, b)
        rejected = [i for i, v in enumerate(codes) if v == REJECTED]
        # one increment per rejecting stage, not per item (an attack burst rejects whole batches)
        for reason, count in collections.Counter(rows.reason[i] or "unknown" for i in rejected).items():
            metrics.rejections.labels(detector=reason[: -len(" failed")] if reason.endswith(" failed") else reason).inc(count)
        if verdict_mode == "request":
            return rejection(rows, rejected[0], explain), None
    return None, Answer(
        logits=batch.logits[a:b], verdict=batch.verdict[a:b], reasons=batch.reasons[a:b],
        scores={k: v[a:b] for k, v in batch.scores.items()},
        radius=None if batch.radius is None else batch.radius[a:b], verdict_names=batch.names[a:b],
    )


def blocked(result: PipelineResult, now: float) -> _Failure | None:
    """The RESOURCE_EXHAUSTED answer when an item's client is blocked (module docstring), else None."""
    ends = [(e, i) for i, e in enumerate(result.blocked) if e is not None]
    if not ends:
        return None
    end, i = max(ends)
    stage = result.reason[i] or "unknown"
    wait = max(0.0, end - now)
    return _Failure(
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"client refused by robustgate: retry after {math.ceil(wait)} s; stage {stage}",
        "blocked",
        (("robustgate-verdict", "blocked"), ("robustgate-stage", stage), ("retry-after-ms", str(math.ceil(wait * 1000)))),
    )


def limited(message: str, retry_after_s: float) -> _Failure:
    """The RESOURCE_EXHAUSTED answer of a client over its rate limit or budget (proxy/ratelimit.py)."""
    ms = "-1" if math.isinf(retry_after_s) else str(math.ceil(retry_after_s * 1000))  # -1: never (request > burst)
    return _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"client limit: {message}", "limited",
                    (("robustgate-verdict", "limited"), ("retry-after-ms", ms)))


def apply_outputs(logits: np.ndarray, policy, probabilities: bool = False, kind: str | None = None) -> np.ndarray:
    """``[N, K]`` logits (NaN rows = rejected items, kept NaN) -> what the answer carries under the
    output policy ``policy`` (proxy/config.py OutputsConfig; proxy/outputs.py): ``logits`` unchanged;
    ``top_k`` the k largest probabilities rounded, others 0; ``label`` the argmax one-hot (1 at the
    class, 0 elsewhere: the output keeps its name and ``[N, K]`` shape, so clients that take the
    argmax keep working); ``aaa`` the AAA-post-processed logits.

    ``probabilities``: the model's own output holds probabilities (the bundle's
    ``backbone.output_kind``); the pipeline then ran on their logarithms (models/output_kind.py), and
    the answer is turned back into probabilities: ``logits`` answers ``exp`` of them (the model's own
    probabilities, or an ensemble's averaged ones), ``aaa`` the softmax of its logits; ``top_k`` and
    ``label`` are the same either way. ``kind``: the policy to apply instead of ``policy.policy``, with
    ``policy``'s parameters (a trusted client's ``outputs.trusted_policy``)."""
    kind = kind or policy.policy
    if kind == "logits":
        return to_probabilities(logits) if probabilities else logits
    from robustgate.proxy import outputs

    out = np.full_like(logits, np.nan, dtype=np.float32)
    ok = ~np.isnan(logits).any(axis=1)
    if ok.any():
        z = logits[ok]
        if kind == "top_k":
            out[ok] = outputs.top_k_probabilities(z, policy.k, policy.decimals)
        elif kind == "label":
            onehot = np.zeros_like(z, dtype=np.float32)
            onehot[np.arange(len(z)), outputs.label_only(z)] = 1.0
            out[ok] = onehot
        elif kind == "aaa":
            u = outputs.aaa(z, tau=policy.tau, alpha=policy.alpha, temperature=policy.temperature)
            out[ok] = outputs.softmax(u).astype(np.float32) if probabilities else u
        else:
            raise ValueError(f"unknown output policy {kind!r}")
    return out


def outcome(verdict: np.ndarray) -> str:
    """The request's outcome label for ``robustgate_requests_total``: rejected, flagged or accepted."""
    return VERDICT_NAMES[max(np.asarray(verdict).tolist())]  # the worst: REJECTED > FLAGGED > ACCEPTED
