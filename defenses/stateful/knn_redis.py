"""The k-NN stateful detector's history in Redis: every replica behind a Service sees a client's whole
stream (an attacker spread over pods by the load balancer is seen whole), as Blacklight's
:class:`~robustgate.defenses.stateful.store.RedisStore` does for its hashes.

Same calls and results as :class:`~robustgate.defenses.stateful.knn_store.KnnMemoryStore`
(``observe(client, digests [N], embeddings [N, d], k, now, window) -> [N, k]`` distances to the
``k`` nearest live earlier queries of the client among its last ``window``, ``inf`` for an exact
retry), with Redis's bounds: ``max_per_client`` and ``ttl_s`` are enforced by the script, the
global bounds by Redis's ``maxmemory`` with ``maxmemory-policy allkeys-lru`` (``max_entries`` and
``max_clients`` are not enforced there, as for Blacklight).

Keys per client, one hash tag (Redis Cluster safe): a list of its recorded queries, newest first
(``"<time> <digest> " + embedding bytes``: float32, little-endian), capped at ``max_per_client``; a
sorted set of their digests scored by sequence number (the exact-retry check over the whole
history, without reading it); its query count (also the ``block_window`` count of
``add_detections``). One Lua script per client and call checks the client's block (when asked),
recognises retries, records the new queries and returns the history the queries are compared with
(at most ``window`` rows); the distances are computed here, in numpy -- a Lua loop over 256 rows of
32 floats per query would hold Redis's one thread for every replica. A batch's clients go in one
pipeline: one round trip per batch, the block check included (:meth:`KnnRedisStore.observe_unblocked`).

Keys are namespaced by ``prefix`` and ``namespace`` (the stage's fitted encoder: a refitted encoder's
embeddings do not compare with the old ones, so its replicas start a new history; stage_store in
defenses/assemble.py passes it).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from robustgate.defenses.stateful.knn_store import k_smallest, pairwise_sq
from robustgate.defenses.stateful.store import RedisStore

# KEYS: [1] digests (sorted set: digest hex -> seq), [2] entries (list, newest first), [3] query count,
#       [4] the client's block (its end, seconds since the epoch)
# ARGV: now, ttl_s, max_per_client, rows (the most history rows returned), check the block (0/1), n,
#       then n pairs (digest hex, "<time> <digest> " + embedding bytes)
# returns {"b", block end} when blocked (nothing recorded), else {flags: n chars, "1" an exact retry,
#          the query count before the call, the history before the call: entries newest first}
_LUA = """
local now, ttl, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rows, n = tonumber(ARGV[4]), tonumber(ARGV[6])
if ARGV[5] == '1' then
  local b = redis.call('GET', KEYS[4])
  if b and tonumber(b) > now then return {'b', b} end
end
local cur0 = tonumber(redis.call('GET', KEYS[3]) or '0')
local out = {'', cur0}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, rows - 1)) do out[#out + 1] = e end
local flags, cur, pos = {}, cur0, 7
for i = 1, n do
  local d, e = ARGV[pos], ARGV[pos + 1]
  pos = pos + 2
  local retry = false
  local s = redis.call('ZSCORE', KEYS[1], d)
  if s and cur - tonumber(s) < maxc then  -- a live entry of the same digest: its time decides
    local old = redis.call('LINDEX', KEYS[2], cur - tonumber(s))
    if old and now - tonumber(string.sub(old, 1, string.find(old, ' ', 1, true) - 1)) <= ttl then retry = true end
  end
  if retry then
    flags[i] = '1'
  else
    flags[i] = '0'
    cur = cur + 1
    redis.call('LPUSH', KEYS[2], e)
    redis.call('ZADD', KEYS[1], cur, d)
  end
end
out[1] = table.concat(flags)
if cur > cur0 then
  redis.call('SET', KEYS[3], cur)
  redis.call('LTRIM', KEYS[2], 0, maxc - 1)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cur - maxc)
end
local ms = math.ceil(ttl * 1000)
for j = 1, 3 do redis.call('PEXPIRE', KEYS[j], ms) end
return out
"""


def _entry(now: float, digest: int, emb: np.ndarray) -> bytes:
    return f"{now:.6f} {digest:016x} ".encode() + emb.astype("<f4", copy=False).tobytes()


def _parse(entries: list[bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """History entries (newest first) -> times ``[M]`` float64, embeddings ``[M, dim]`` float32."""
    if not entries:
        return np.zeros(0), np.zeros((0, dim), dtype=np.float32)
    times = np.array([float(e[:e.index(b" ")]) for e in entries])
    emb = np.frombuffer(b"".join(e[-4 * dim:] for e in entries), dtype="<f4").reshape(len(entries), dim)
    return times, emb.astype(np.float32)


def neighbours(hist: np.ndarray, visible: np.ndarray, queries: np.ndarray, k: int, window: int | None,
               lim: int) -> np.ndarray:
    """``[R, k]`` distances of the ``R`` queries a call records, in order, to their ``k`` nearest earlier
    queries (``inf``-padded), with :class:`KnnMemoryStore`'s rule: the ``j``-th sees the history rows
    ``hist`` ``[M, d]`` (newest first) that ``visible`` ``[R, M]`` allows it, the newest ``window - j``
    of them, and the call's earlier queries ``j - i <= min(lim, window)``."""
    r = queries.shape[0]
    parts = []
    if hist.shape[0]:
        d2 = pairwise_sq(queries, hist)  # [R, M]
        d2[~visible] = np.inf
        if window is not None:
            rank = np.cumsum(visible, axis=1)  # 1 = the newest row the query sees
            d2[rank > (window - np.arange(r))[:, None]] = np.inf
        parts.append(d2)
    if r > 1:
        gap = np.arange(r)[:, None] - np.arange(r)[None, :]
        mine = pairwise_sq(queries, queries)
        mine[~((gap > 0) & (gap <= min(lim, window or lim)))] = np.inf
        parts.append(mine)
    if not parts:
        return np.full((r, k), np.inf, dtype=np.float32)
    return np.sqrt(k_smallest(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1), k))


class KnnRedisStore(RedisStore):
    """The k-NN embedding history shared through one Redis server (module docstring). ``url``,
    ``prefix``, ``socket_timeout_s``: as :class:`RedisStore`; ``namespace``: the encoder the
    embeddings come from (a key component)."""

    backend = "redis"
    holds = "embeddings"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", max_entries: int = 1_000_000,
                 max_per_client: int = 10_000, max_clients: int = 100_000, ttl_s: float = 3600.0,
                 prefix: str = "rg:knn", socket_timeout_s: float = 0.5, namespace: str = ""):
        if any(c in namespace for c in "{} "):
            raise ValueError(f"namespace must have no braces or spaces, got {namespace!r}")
        super().__init__(url, max_entries, max_per_client, max_clients, ttl_s,
                         f"{prefix}:{namespace}" if namespace else prefix, socket_timeout_s)
        self._knn_script = self._redis.register_script(_LUA)
        self._dim: int | None = None

    def _keys(self, client: str) -> list[str]:
        keys = super()._keys(client)
        return keys + [keys[0][:-2] + ":b"]  # the block key (RedisStore._block_key), for the script

    def observe(self, client: str, digests: np.ndarray, embeddings: np.ndarray, k: int,
                now: float | None = None, window: int | None = None) -> np.ndarray:
        return self.observe_batch([(client, digests, embeddings)], k, now, window)[0]

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]], k: int,
                      now: float | None = None, window: int | None = None) -> list[np.ndarray]:
        """:class:`KnnMemoryStore`'s ``observe_batch``, one round trip for the batch."""
        return self._run(groups, k, now, window, False)[1]

    def observe_unblocked(self, groups: list[tuple[str, np.ndarray, np.ndarray]], now: float | None = None,
                          k: int | None = None, window: int | None = None
                          ) -> tuple[list[float | None], list[np.ndarray | None]]:
        """``HistoryStore.observe_unblocked`` in one round trip: each client's script checks its block."""
        if k is None:
            raise TypeError("observe_unblocked needs k")
        return self._run(groups, k, now, window, True)

    def _run(self, groups, k, now, window, check_block):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive integer or None, got {window!r}")
        for _, d, e in groups:
            if d.dtype != np.uint64 or d.ndim != 1:
                raise ValueError(f"digests must be [N] uint64, got {d.dtype} {d.shape}")
            if e.ndim != 2 or e.shape[0] != d.shape[0]:
                raise ValueError(f"embeddings must be [N, d] with N = {d.shape[0]}, got {e.shape}")
            if self._dim is not None and e.shape[1] != self._dim:
                raise ValueError(f"embeddings have {e.shape[1]} dimensions, this store holds {self._dim}")
            self._dim = self._dim or int(e.shape[1])
        if not groups:
            return [], []
        now = time.time() if now is None else float(now)
        rows = self.max_per_client if window is None else min(window, self.max_per_client)
        pipe = self._redis.pipeline(transaction=False)
        for client, d, e in groups:
            args: list[Any] = [repr(now), repr(self.ttl_s), self.max_per_client, rows, int(check_block), len(d)]
            for digest, emb in zip(d.tolist(), np.asarray(e, dtype=np.float32)):
                args += [f"{digest:016x}", _entry(now, digest, emb)]
            self._knn_script(keys=self._keys(client), args=args, client=pipe)
        ends, out = [], []
        for (_, d, e), reply in zip(groups, pipe.execute()):
            if reply[0] == b"b":
                ends.append(float(reply[1]))
                out.append(None)
                continue
            ends.append(None)
            out.append(self._distances(reply, np.asarray(e, dtype=np.float32), k, now, window))
        return ends, out

    def _distances(self, reply: list, emb: np.ndarray, k: int, now: float, window: int | None) -> np.ndarray:
        """One client's script reply -> ``[N, k]`` (module docstring)."""
        retry = np.frombuffer(reply[0], dtype=np.uint8) == ord("1")  # [N]
        out = np.full((emb.shape[0], k), np.inf, dtype=np.float32)
        if retry.all():
            return out
        times, hist = _parse(reply[2:], emb.shape[1])  # [M], [M, d], newest first: row i is the query count - i
        r, lim = int((~retry).sum()), self.max_per_client
        # the j-th recorded query sees history row i while fewer than max_per_client queries were recorded
        # after it (i + j < lim) within ttl_s
        visible = (np.arange(len(times))[None, :] + np.arange(r)[:, None] < lim) & (now - times <= self.ttl_s)[None, :]
        out[~retry] = neighbours(hist, visible, emb[~retry], k, window, lim)
        return out

    def stats(self) -> dict[str, int]:
        info = self._redis.info("memory")
        entries = clients = 0
        for name in self._redis.scan_iter(match=f"{self.prefix}:*:e", count=1000):
            clients += 1
            entries += int(self._redis.llen(name))
        return {"entries": entries, "clients": clients, "bytes": int(info["used_memory"])}
