"""Per-client query budgets and rate limits, keyed on the client identity (proxy/identity.py).

Two limits, each optional, counted in *queries* (items: a request of 8 images is 8 queries, as a
query-based attack counts them):

- a token bucket per client: ``rate_per_s`` tokens per second, at most ``burst`` held; a request
  of ``n`` items takes ``n`` tokens or is refused whole (nothing taken);
- a budget per window: at most ``budget`` queries per client in a fixed window of ``window_s``
  seconds (default one day) that starts with the client's first query and restarts when it ends.

A refused request is answered RESOURCE_EXHAUSTED with a retry hint (seconds until the request
would pass: the bucket refilled enough, or the window ended) in the message and in the trailing
metadata ``retry-after-ms``; it never reaches the batcher, so a client over its limit costs the
server a decode-free refusal. State is per proxy replica (N replicas behind a Service allow about
N times the limits; docs/OPERATIONS.md "Client budgets") and bounded: at most ``max_clients``
clients are remembered, the least recently seen forgotten first (a forgotten client starts with a
full bucket and a fresh window). Not thread-safe: the server calls it on its event loop only.

Written here rather than taken from a library: the rate limiters on PyPI (``limits``,
``aiolimiter``) are per-process single-key throttles or need a storage server; a bounded LRU of
buckets with a refusal that reports its retry time is the 60 lines below.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Refusal:
    """Why a client's request is refused: ``reason`` ``rate`` or ``budget``, ``retry_after_s`` the
    seconds until the same request would pass (inf: never, it is larger than ``burst``)."""

    reason: str
    retry_after_s: float
    message: str


class _Client:
    __slots__ = ("tokens", "stamp", "window_start", "used", "refusing")

    def __init__(self, tokens: float, now: float):
        self.tokens, self.stamp, self.window_start, self.used, self.refusing = tokens, now, now, 0, False


class ClientLimiter:
    """Args: ``rate_per_s`` / ``burst`` (token bucket; None = no rate limit), ``budget`` /
    ``window_s`` (queries per window; None = no budget), ``max_clients`` remembered, ``clock``."""

    def __init__(self, rate_per_s: float | None = None, burst: int | None = None, budget: int | None = None,
                 window_s: float = 86400.0, max_clients: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if rate_per_s is not None and not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0 or None, got {rate_per_s!r}")
        if burst is not None and burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be >= 1 or None, got {budget!r}")
        if not window_s > 0 or max_clients < 1:
            raise ValueError(f"window_s must be > 0 and max_clients >= 1, got {window_s!r}, {max_clients!r}")
        self.rate, self.budget, self.window_s, self.max_clients, self.clock = rate_per_s, budget, window_s, max_clients, clock
        self.burst = float(burst if burst is not None else max(1.0, math.ceil(rate_per_s or 1.0)))
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate is not None or self.budget is not None

    def __len__(self) -> int:
        return len(self._clients)

    def _get(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(self.burst, now)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return state

    def check(self, client: str, n: int = 1) -> tuple[Refusal | None, bool]:
        """Takes ``n`` queries of ``client``'s limits -> (None, False) when admitted, else (the
        refusal, whether this is the client's first refusal since it was last admitted: a newly
        blocked client, counted once by the metrics)."""
        if not self.enabled:
            return None, False
        now = self.clock()
        s = self._get(client, now)
        refusal = None
        if self.budget is not None:
            if now - s.window_start >= self.window_s:
                s.window_start, s.used = now, 0
            if s.used + n > self.budget:
                wait = s.window_start + self.window_s - now
                refusal = Refusal("budget", wait, f"query budget exhausted: {s.used} of {self.budget} queries used in "
                                                  f"this {self.window_s:g} s window; retry after {wait:.1f} s")
        if refusal is None and self.rate is not None:
            s.tokens = min(self.burst, s.tokens + (now - s.stamp) * self.rate)
            s.stamp = now
            if n > s.tokens:
                wait = math.inf if n > self.burst else (n - s.tokens) / self.rate
                refusal = Refusal("rate", wait, f"rate limit: {self.rate:g} queries/s, burst {self.burst:g}; "
                                                f"retry after {wait:.3f} s")
        if refusal is not None:
            first, s.refusing = not s.refusing, True
            return refusal, first
        if self.rate is not None:
            s.tokens -= n
        s.used += n
        s.refusing = False
        return None, False
