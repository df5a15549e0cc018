"""The interface of stateful detectors: scores that depend on what the same client sent before.

A per-image detector (defenses.base.Detector) sees one item; a query-based black-box attack
(Square, NES, HopSkipJump, ...) is only visible as a *stream* of near-copies from one client. A
:class:`StatefulDetector` therefore takes the client's identity with the batch:

    observe(client, x [N, C, H, W]) -> scores [N]

records each query in that client's history (a :class:`~robustgate.defenses.stateful.store.HistoryStore`)
and scores it against that history, in order (``observe`` = ``observe_encoded(client, encode(x))``:
the pipeline encodes a batch of many clients in one call, then scores each client's rows); higher = more like a query attack; a query is
flagged when ``score > threshold`` (the threshold calibrated on benign streams by
defenses.stateful.calibration). Like every defense, the constructor's keyword arguments are the
configuration (``config()``); the store is not configuration but state: the proxy builds it once
and hands the same object to the detector of every config reload (``store=``), so a reload keeps
the attackers' histories.

Not registered in the defense registry: the pipeline runner calls ``Detector.score(x)`` without a
client; the integration step passes each item's client identity (proxy/identity.py) and calls
``observe``.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from robustgate.defenses.base import Defense, Role, check_images
from robustgate.defenses.stateful.store import HistoryStore, MemoryStore


class StatefulDetector(Defense):
    """Base of the stateful detectors: one required method, :meth:`observe`."""

    role: ClassVar[Role] = "detector"
    differentiable: ClassVar[bool] = False  # a white-box attacker gets no gradient through the history

    def __init__(self, threshold: float | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                 store: HistoryStore | None = None):
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be a number or None, got {threshold!r}")
        lo, hi = value_range
        if not lo < hi:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.value_range = (float(lo), float(hi))
        self.store = store if store is not None else self.default_store()

    def default_store(self) -> HistoryStore:
        """The store used when none is handed in: an in-memory one with the default bounds."""
        return MemoryStore()

    def private_store(self, **bounds) -> HistoryStore:
        """A fresh in-memory store of this detector's kind with ``bounds`` (``max_entries``,
        ``max_per_client``, ``max_clients``, ``ttl_s``): the calibration's private history."""
        return MemoryStore(**bounds)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("store", None)  # state, not configuration
        return cfg

    def observe(self, client: str, x: torch.Tensor, now: float | None = None) -> torch.Tensor:
        """Records the queries ``x`` ``[N, C, H, W]`` (raw pixels in ``value_range``) of ``client`` in
        order and returns their scores ``[N]`` float32 (each against the history before it)."""
        return self.observe_encoded(client, self.encode(x), now)

    def encode(self, x: torch.Tensor | np.ndarray, embedding: np.ndarray | None = None,
               checked: bool = False) -> tuple[np.ndarray, ...]:
        """What the store keeps of each query, for a whole batch of any clients at once: ``x``
        ``[N, C, H, W]`` -> arrays with first dimension ``N`` (row ``i`` is item ``i``'s), so that the
        pipeline encodes a batch once and hands each client its rows (:meth:`observe_encoded`).
        ``embedding`` ``[N, d]``: what :meth:`onnx_embedding_model`'s graph gave for ``x`` in the
        backbone's fused pass (proxy/backends/fuse.py), used instead of computing it again.
        ``checked``: ``x`` is a host tensor without autograd, or with ``embedding`` the fused path's
        float32 array, that the caller validated (range and finiteness: the proxy's codec does for
        every request; PipelineRunner's input), so neither the
        check nor the detach to the host is repeated -- in a batch worker each tensor call releases and
        retakes the GIL, and the event loop holds it meanwhile (the stage's time per item in the server:
        bench/results/defenses.proxy_cost.stateful.md)."""
        if not checked:
            check_images(x, self.value_range, who=f"{self.kind} input")
            x = x.detach().cpu()
        if embedding is None:
            return self._encode(x)
        return self._encode_embedded(x, embedding)

    def onnx_embedding_model(self):
        """The per-item part of :meth:`encode` that a network computes, as one ONNX graph ``[N, C, H, W]``
        raw input -> ``[N, d]``, for the backend to fuse into the backbone's session (one session call
        for both); ``None`` (the default): nothing to fuse. Its output, handed to :meth:`encode`,
        must give what :meth:`encode` computes itself (a parity test)."""
        return None

    def _encode_embedded(self, x: torch.Tensor, embedding: np.ndarray) -> tuple[np.ndarray, ...]:
        """``encode`` with the fused pass's ``embedding`` ``[N, d]`` (:meth:`onnx_embedding_model`)."""
        raise ValueError(f"{self.kind}: has no embedding model; encode computes everything itself")

    def observe_encoded(self, client: str, encoded: tuple[np.ndarray, ...], now: float | None = None) -> torch.Tensor:
        """:meth:`observe` on rows of :meth:`encode`'s output: ``[N]`` float32 scores, in order."""
        return self.observe_groups([(client, encoded)], now)[0]

    def _check_clients(self, groups: list[tuple[str, Any]]) -> None:
        for client, _ in groups:
            if not isinstance(client, str) or not client:
                raise ValueError(f"{self.kind}: client must be a non-empty string, got {client!r}")

    def observe_groups(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None = None) -> list[torch.Tensor]:
        """Several clients' encoded queries ``[(client, encoded rows), ...]`` observed as if one client
        after the other, in the order given -> one ``[N_c]`` float32 score tensor per group."""
        self._check_clients(groups)
        return self._observe_groups(groups, now)

    def observe_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None = None) -> np.ndarray:
        """:meth:`observe_groups`' scores concatenated in group order, as one ``[sum N_c]`` float32 numpy
        array (the pipeline's per-batch call: no tensor per client)."""
        self._check_clients(groups)
        return self._observe_rows(groups, now)

    def _observe_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None) -> np.ndarray:
        """``observe_rows`` after validation; by default from :meth:`_observe_groups`."""
        scores = [s.reshape(-1).float().numpy() for s in self._observe_groups(groups, now)]
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def observe_live_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]],
                          now: float | None = None) -> tuple[list[float | None], np.ndarray]:
        """The pipeline's per-batch step (defenses/pipeline.py ``observe_clients``): for ``groups`` as
        :meth:`observe_rows` takes them, each group's client's block end at ``now`` (None: not
        blocked) and :meth:`observe_rows`' scores of the unblocked groups' rows only (a blocked
        client's queries are not recorded). The k-NN and Blacklight methods ask their store both in
        one call (``HistoryStore.observe_unblocked``: one round trip to the replica's shared store)."""
        self._check_clients(groups)
        return self._observe_live_rows(groups, time.time() if now is None else float(now))

    def _observe_live_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]],
                           now: float) -> tuple[list[float | None], np.ndarray]:
        """``observe_live_rows`` after validation; by default the block check, then :meth:`_observe_rows`."""
        ends = self.store.blocked_many([client for client, _ in groups], now)
        return ends, self._observe_rows([g for g, end in zip(groups, ends) if end is None], now)

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> tuple[np.ndarray, ...]:
        """``encode`` after validation: ``x`` ``[N, C, H, W]`` on the CPU -> arrays ``[N, ...]``."""

    @abstractmethod
    def _observe_groups(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None) -> list[torch.Tensor]:
        """``observe_groups`` after validation."""

    def is_adversarial(self, scores: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: score above the calibrated threshold."""
        if self.threshold is None:
            raise ValueError(f"{self.kind}: no threshold; calibrate it on benign streams before use")
        return scores > self.threshold
