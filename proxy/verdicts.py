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

from robustgate.defenses.pipeline import REJECTED, PipelineResult
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


def verdict_answer(result: PipelineResult, verdict_mode: str, metrics: Metrics,
                   explain: bool = False) -> tuple[_Failure | None, Answer | None]:
    """One request's share of a batch result -> (the rejection, None) in request mode when an item
    was rejected, else (None, the answer to encode: logits ``[N, K]`` with rejected rows NaN, the
    verdicts ``[N]``, reasons, detector scores, radius). Counts items by verdict and rejections by
    stage in ``metrics``."""
    verdict = result.verdict.numpy()  # [N]
    for v, count in enumerate(np.bincount(verdict, minlength=len(VERDICT_NAMES)).tolist()):
        if count:  # one increment per verdict, not per item (~3.5 us each on the event loop)
            metrics.items.labels(verdict=VERDICT_NAMES[v]).inc(count)
    rejected = np.flatnonzero(verdict == REJECTED)
    # one increment per rejecting stage, not per item (an attack burst rejects whole batches)
    for reason, count in collections.Counter(result.reason[i] or "unknown" for i in rejected.tolist()).items():
        metrics.rejections.labels(detector=reason[: -len(" failed")] if reason.endswith(" failed") else reason).inc(count)
    if rejected.size and verdict_mode == "request":
        return rejection(result, int(rejected[0]), explain), None
    logits = result.logits.detach().cpu().numpy().astype(np.float32, copy=True)  # [N, K]
    logits[rejected] = np.nan
    return None, Answer(
        logits=logits, verdict=verdict, reasons=result.reason,
        scores={k: v.detach().cpu().numpy() for k, v in result.scores.items()},
        radius=None if result.radius is None else result.radius.detach().cpu().numpy(),
    )


def outcome(verdict: np.ndarray) -> str:
    """The request's outcome label for ``robustgate_requests_total``: rejected, flagged or accepted."""
    if (verdict == REJECTED).any():
        return "rejected"
    return "flagged" if (verdict != 0).any() else "accepted"
