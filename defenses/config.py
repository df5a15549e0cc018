"""The ``pipeline:`` section's configuration: :class:`StageConfig` and :class:`PipelineConfig` (pydantic),
validated once at the edge, with errors that name the bad key (:func:`describe_error`).

Kept apart from the assembly that builds the stages (defenses/assemble.py, which re-exports these
names) so that reading a config imports no torch: ``robustgate serve``'s supervisor of
``server.workers`` processes reads it, resolves the workers and starts them without the ~300 MiB and
~1.4 s that importing torch costs (bench/results/hardening.startup.md).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGE_NAME = r"^[A-Za-z0-9_.-]+$"  # safe in output names, metric labels and metadata
Device = Literal["cpu", "cuda", "auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageConfig(_Strict):
    name: str = Field(pattern=STAGE_NAME)
    kind: str
    action: Literal["reject", "flag", "log", "block"] = "reject"  # block: stateful stages only
    params: dict[str, Any] = {}  # merged over the bundle's fitted params (stage params win)
    threshold: float | None = None  # overrides the bundle's calibrated threshold
    device: Device | None = None  # overrides pipeline.device for this stage
    # stateful stages (kind: stateful): the history store, built once and kept across reloads
    # ({kind: memory | redis, url, max_entries, max_per_client, max_clients, ttl_s, ...}; defenses/stateful/store.py)
    store: dict[str, Any] | None = None
    cooldown_s: float = Field(300.0, gt=0)  # action block: how long a detected client is refused
    # action block: detections of one client that block it; a query attack is detected on nearly every
    # query, a benign client at the per-query FPR now and then
    block_after: int = Field(5, ge=1)
    block_window: int | None = Field(100, ge=1, description=(
        "action block: block_after counts the detections among the client's last block_window remembered "
        "queries; null = every detection until the store's ttl_s after the last one, which a long-lived benign "
        "client reaches at any false-positive rate above zero (docs/OPERATIONS.md, 'block'); >= block_after"))

    @model_validator(mode="after")
    def _stateful_only(self) -> "StageConfig":
        if self.kind != "stateful" and self.store is not None:
            raise ValueError(f"store: only stateful stages keep a store (kind is {self.kind!r})")
        if self.kind != "stateful" and self.action == "block":
            raise ValueError(f"action: block needs kind stateful (it blocks a client), got kind {self.kind!r}")
        if self.block_window is not None and self.block_window < self.block_after:
            raise ValueError(f"block_window ({self.block_window}) must be at least block_after ({self.block_after})")
        return self


class PipelineConfig(_Strict):
    stages: list[StageConfig] = []
    failure_policy: Literal["fail-closed", "fail-open"] = "fail-closed"
    verdict_mode: Literal["request", "item"] = "request"
    seed: int | None = None  # fixed per-batch seed (tests); None = fresh os.urandom seed per batch
    # an ensemble's copies per backend call (smoothing's n0 + n copies per item add up fast); more -> several calls
    max_fanout_items: int = Field(4096, ge=1)
    device: Device = "cpu"  # where the stages compute; auto = cuda when available (defenses/assemble.py, "Device")
    purify_threads: int | None = Field(None, ge=1, description=(
        "parts of a large batch that the median filter and JPEG compute at once, in threads of their own "
        "(defenses/purify/parts.py), while the backbone's pool waits; null = the cores the process is given (with "
        "server.workers N, each worker's share: the cores / N, at least 1); "
        "read by robustgate serve at start (a reload keeps the running count); eval and library use keep 1"))

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        return v


def describe_error(exc: ValidationError, prefix: str = "") -> str:
    """``key.path: message; ...`` for every error of ``exc``, each key under ``prefix``."""
    parts = []
    for err in exc.errors():
        key = ".".join([p for p in (prefix,) if p] + [str(p) for p in err["loc"]]) or "config"
        parts.append(f"{key}: {re.sub(r'^Value error, ', '', err['msg'])}")
    return "; ".join(parts)
