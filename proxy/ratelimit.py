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
server a decode-free refusal.

Two stores (``limits.per_client.store``, :func:`build_limiter`):

- :class:`ClientLimiter` (``kind: memory``, the default): state per process (N workers or replicas
  allow a client that spreads its connections over them about N times the limits; docs/OPERATIONS.md
  "Client budgets") and bounded: at most ``max_clients`` clients are remembered, the least recently
  seen forgotten first (a forgotten client starts with a full bucket and a fresh window). Not
  thread-safe: the server calls it on its event loop only.
- :class:`RedisClientLimiter` (``kind: redis``): the same rules in one Lua script per request, atomic
  in Redis, on the Redis server's clock, so every worker and replica that names the server shares
  each client's bucket and budget. A client's hash expires once a fresh one would be the same (its
  window over, its bucket full again); bound the rest with Redis's ``maxmemory``. The server awaits
  it on its event loop (redis.asyncio): one round trip per limited request.

Written here rather than taken from a library: the rate limiters on PyPI (``limits``,
``aiolimiter``) are per-process single-key throttles, and ``limits`` (also with its Redis storage)
offers fixed and moving windows but no token bucket, nor a window that starts with the client's
first query; the rules are the 60 lines of :class:`ClientLimiter` and their Lua twin.
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


def _check_limits(rate_per_s: float | None, burst: int | None, budget: int | None, window_s: float) -> float:
    """Validates the limits (ValueError naming the bad one); returns the bucket size."""
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0 or None, got {rate_per_s!r}")
    if burst is not None and burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be >= 1 or None, got {budget!r}")
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    return float(burst if burst is not None else max(1.0, math.ceil(rate_per_s or 1.0)))


def budget_refusal(used: int, budget: int, window_s: float, wait: float) -> Refusal:
    return Refusal("budget", wait, f"query budget exhausted: {used} of {budget} queries used in this {window_s:g} s "
                                   f"window; retry after {wait:.1f} s")


def rate_refusal(rate: float, burst: float, wait: float) -> Refusal:
    return Refusal("rate", wait, f"rate limit: {rate:g} queries/s, burst {burst:g}; retry after {wait:.3f} s")


class _Client:
    __slots__ = ("tokens", "stamp", "window_start", "used", "refusing")

    def __init__(self, tokens: float, now: float):
        self.tokens, self.stamp, self.window_start, self.used, self.refusing = tokens, now, now, 0, False


class ClientLimiter:
    """In-process limits (module docstring). Args: ``rate_per_s`` / ``burst`` (token bucket; None =
    no rate limit), ``budget`` / ``window_s`` (queries per window; None = no budget), ``max_clients``
    remembered, ``clock``."""

    remote = False  # checked in-process (check), not awaited

    def __init__(self, rate_per_s: float | None = None, burst: int | None = None, budget: int | None = None,
                 window_s: float = 86400.0, max_clients: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.burst = _check_limits(rate_per_s, burst, budget, window_s)
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients!r}")
        self.rate, self.budget, self.window_s, self.max_clients, self.clock = rate_per_s, budget, window_s, max_clients, clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate is not None or self.budget is not None

    async def aclose(self) -> None:
        """Nothing to release (the Redis limiter's counterpart closes its connections)."""

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
                refusal = budget_refusal(s.used, self.budget, self.window_s, s.window_start + self.window_s - now)
        if refusal is None and self.rate is not None:
            s.tokens = min(self.burst, s.tokens + (now - s.stamp) * self.rate)
            s.stamp = now
            if n > s.tokens:
                refusal = rate_refusal(self.rate, self.burst, math.inf if n > self.burst else (n - s.tokens) / self.rate)
        if refusal is not None:
            first, s.refusing = not s.refusing, True
            return refusal, first
        if self.rate is not None:
            s.tokens -= n
        s.used += n
        s.refusing = False
        return None, False


class LimitStoreError(Exception):
    """The shared limits could not be read or written (Redis unreachable, slow or failing)."""


# One client's limits (RedisClientLimiter), :meth:`ClientLimiter.check`'s rules line for line: KEYS[1]
# the client's hash; ARGV n, rate (0: none), burst, budget (0: none), window_s. Returns {} when
# admitted, else {reason, wait (s; -1: never), used, first (1: the first refusal since admitted)}.
# Floats travel as strings (a Lua number returned to Redis is cut to an integer).
_LUA = """
local n, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tokens', 'stamp', 'wstart', 'used', 'refusing')
local tokens, stamp = tonumber(s[1]) or burst, tonumber(s[2]) or now
local wstart, used, refusing = tonumber(s[3]) or now, tonumber(s[4]) or 0, tonumber(s[5]) or 0
local reason, wait = nil, 0
if budget > 0 then
  if now - wstart >= window then wstart, used = now, 0 end
  if used + n > budget then reason, wait = 'budget', wstart + window - now end
end
if reason == nil and rate > 0 then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
  if n > tokens then
    reason = 'rate'
    if n > burst then wait = -1 else wait = (n - tokens) / rate end
  end
end
local first = 0
if reason ~= nil then
  if refusing == 0 then first = 1 end
  refusing = 1
else
  if rate > 0 then tokens = tokens - n end
  used = used + n
  refusing = 0
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens), 'stamp', string.format('%.6f', stamp),
           'wstart', string.format('%.6f', wstart), 'used', used, 'refusing', refusing)
local keep = 0
if budget > 0 then keep = wstart + window - now end
if rate > 0 then keep = math.max(keep, (burst - tokens) / rate) end
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.min(math.ceil(keep * 1000) + 1000, 1e15)))
if reason == nil then return {} end
return {reason, string.format('%.6f', wait), tostring(used), first}
"""


class RedisClientLimiter:
    """The limits of :class:`ClientLimiter` kept in Redis (module docstring), shared by every worker
    and replica whose ``url`` and ``prefix`` are the same. ``timeout_s``: one round trip's limit;
    a failure raises :class:`LimitStoreError` (the server applies ``on_error``)."""

    remote = True  # awaited on the event loop (acheck)

    def __init__(self, url: str, prefix: str = "robustgate:limits", rate_per_s: float | None = None,
                 burst: int | None = None, budget: int | None = None, window_s: float = 86400.0,
                 timeout_s: float = 0.25, fail_open: bool = False):
        import redis.asyncio  # the optional extra robustgate[redis]

        self.burst = _check_limits(rate_per_s, burst, budget, window_s)
        self.rate, self.budget, self.window_s, self.prefix, self.fail_open = rate_per_s, budget, window_s, prefix, fail_open
        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_LUA)

    @property
    def enabled(self) -> bool:
        return self.rate is not None or self.budget is not None

    async def acheck(self, client: str, n: int = 1) -> tuple[Refusal | None, bool]:
        """:meth:`ClientLimiter.check`, in Redis: -> (None, False) when admitted, else (the refusal,
        whether it is the client's first since it was last admitted). Raises LimitStoreError."""
        if not self.enabled:
            return None, False
        import redis

        try:
            got = await self._script(keys=[f"{self.prefix}:{client}"],
                                     args=[n, self.rate or 0, self.burst, self.budget or 0, self.window_s])
        except (redis.RedisError, OSError) as exc:
            raise LimitStoreError(f"{type(exc).__name__}: {exc}") from exc
        if not got:
            return None, False
        reason, wait, used, first = got[0].decode(), float(got[1]), int(got[2]), bool(int(got[3]))
        if reason == "budget":
            return budget_refusal(used, self.budget, self.window_s, wait), first
        return rate_refusal(self.rate, self.burst, math.inf if wait < 0 else wait), first

    async def aclose(self) -> None:
        await self._redis.aclose()


def build_limiter(cfg) -> ClientLimiter | RedisClientLimiter:
    """The limiter ``limits.per_client`` (proxy/config.py ClientLimitsConfig) names."""
    limits = dict(rate_per_s=cfg.rate_per_s, burst=cfg.burst, budget=cfg.budget, window_s=cfg.window_s)
    store = cfg.store
    if store.kind == "redis":
        return RedisClientLimiter(store.url, store.prefix, timeout_s=store.timeout_ms / 1000.0,
                                  fail_open=store.on_error == "fail-open", **limits)
    return ClientLimiter(max_clients=cfg.max_clients, **limits)
