"""The k-NN stateful detector's history in Redis: every replica behind a Service sees a client's whole
stream (an attacker spread over pods by the load balancer is seen whole), as Blacklight's
:class:`~robustgate.defenses.stateful.store.RedisStore` does for its hashes.

Same calls and results as :class:`~robustgate.defenses.stateful.knn_store.KnnMemoryStore`
(``observe(client, digests [N], embeddings [N, d], k, now, window) -> [N, k]`` distances to the
``k`` nearest live earlier queries of the client among its last ``window``, ``inf`` for an exact
retry), with Redis's bounds: ``max_per_client`` and ``ttl_s`` are enforced by the script, the
global bounds by Redis's ``maxmemory`` with ``maxmemory-policy allkeys-lru`` (``max_entries`` and
``max_clients`` are not enforced there, as for Blacklight).

Keys per client, one hash tag: its recorded queries as fixed-size records (the time, float64, the
digest, uint64, and the embedding, float32, little-endian) in one string, a ring of ``max_per_client`` slots, read and
written by byte range (a Redis list of the same rows, turned into a Lua table on every call, cost
Redis more than the rest of the script; measured while writing it); a hash of their digests (digest
-> sequence number: the exact-retry check over the whole history, without reading it; a digest
leaves it with its record); its query count (also the ``block_window`` count of ``add_detections``).
One Lua script call per batch, for all of its clients (one round trip, the block check included:
:meth:`KnnRedisStore.observe_unblocked`; a call per client doubled the CPU spent here in redis-py's
packing and parsing), checks each client's block (when asked), recognises retries, records the new
queries and returns the history they are compared with (at most ``window`` rows, one byte range that
numpy reads as it is). The distances are computed here (numpy; the in-process store's compiled pass
for a single query): a Lua loop over 256 rows of 32 floats per query would hold Redis's one thread
for every replica. The script names several clients' keys, so a batch's keys are in several hash
slots: a single Redis server (or a replicated primary), not Redis Cluster -- the store's client is
redis-py's plain one, as Blacklight's is.

Keys are namespaced by ``prefix`` and ``namespace`` (the stage's fitted encoder: a refitted encoder's
embeddings do not compare with the old ones, so its replicas start a new history; stage_store in
defenses/assemble.py passes it).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from robustgate.defenses.stateful.knn_store import check_call, k_smallest, pairwise_sq, scan_kernel
from robustgate.defenses.stateful.store import RedisStore

# One call for a batch's G clients. KEYS: per client 4: its digests (a hash: 8-byte digest -> seq), its records
#   (a string: a ring of max_per_client slots, seq s in slot (s - 1) % max_per_client), its query count, its block
#   (the block's end, epoch seconds)
# ARGV: now, ttl_s, max_per_client, rows (the most history rows returned), check the blocks (0/1), record size,
#   then per client: n, its n records back to back (time <f8, digest <u8, embedding <f4 x d)
# returns per client {"b", block end} when blocked (nothing recorded), else {flags: n chars, "1" an exact retry,
#   the query count before the call, the history before the call: its last records, oldest first}
_LUA = """
local now, ttl, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rows, check, size = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
local ms, replies = math.ceil(ttl * 1000), {}
-- a ring string is grown by a quarter, to exactly that size (SET): SETRANGE past its end would double its allocation
local function grow(key, len, upto)
  local want = math.min(math.max(upto, math.floor(len * 1.25)), maxc * size)
  redis.call('SET', key, (len > 0 and redis.call('GET', key) or '') .. string.rep('\0', want - len))
  return want
end
for g = 1, #KEYS / 4 do
  local kz, kr, kn, kb = KEYS[4 * g - 3], KEYS[4 * g - 2], KEYS[4 * g - 1], KEYS[4 * g]
  local n, records = tonumber(ARGV[2 * g + 5]), ARGV[2 * g + 6]
  local b = check and redis.call('GET', kb)
  if b and tonumber(b) > now then
    replies[g] = {'b', b}
  else
    local cur0 = tonumber(redis.call('GET', kn) or '0')
    local m, hist = math.min(rows, cur0, maxc), ''
    if m > 0 then
      local first, last = (cur0 - m) % maxc, (cur0 - 1) % maxc
      if first <= last then
        hist = redis.call('GETRANGE', kr, first * size, (last + 1) * size - 1)
      else
        hist = redis.call('GETRANGE', kr, first * size, maxc * size - 1)
          .. redis.call('GETRANGE', kr, 0, (last + 1) * size - 1)
      end
    end
    local flags, cur, len = {}, cur0, nil
    for i = 1, n do
      local e = string.sub(records, size * (i - 1) + 1, size * i)
      local d = string.sub(e, 9, 16)
      local retry = false
      local s = redis.call('HGET', kz, d)
      if s and cur - tonumber(s) < maxc then  -- a live entry of the same digest: its time decides
        local at = ((tonumber(s) - 1) % maxc) * size
        local t = redis.call('GETRANGE', kr, at, at + 7)
        if #t == 8 and now - struct.unpack('<d', t) <= ttl then retry = true end
      end
      if retry then
        flags[i] = '1'
      else
        flags[i] = '0'
        cur = cur + 1
        local at = ((cur - 1) % maxc) * size
        len = len or redis.call('STRLEN', kr)
        if at + size > len then len = grow(kr, len, at + size) end
        if cur > maxc then  -- this slot's record (seq cur - maxc) falls out, its digest too unless sent since
          local old = redis.call('GETRANGE', kr, at + 8, at + 15)
          if #old == 8 and redis.call('HGET', kz, old) == tostring(cur - maxc) then redis.call('HDEL', kz, old) end
        end
        redis.call('SETRANGE', kr, at, e)
        redis.call('HSET', kz, d, cur)
      end
    end
    if cur > cur0 then redis.call('SET', kn, cur) end
    redis.call('PEXPIRE', kz, ms)
    redis.call('PEXPIRE', kr, ms)
    redis.call('PEXPIRE', kn, ms)
    replies[g] = {table.concat(flags), cur0, hist}
  end
end
return replies
"""

_NO_DIGESTS = np.zeros(0, dtype=np.uint64)  # the compiled pass's retry scan is not needed: the script did it


def _records(now: float, digests: np.ndarray, emb: np.ndarray) -> bytes:
    """``[N]`` digests and ``[N, d]`` embeddings of queries sent at ``now`` -> their ``N`` records back to
    back (:func:`_record_dtype`)."""
    rec = np.empty(emb.shape[0], dtype=_record_dtype(emb.shape[1]))
    rec["time"], rec["digest"], rec["emb"] = now, digests, emb
    return rec.tobytes()


@functools.cache
def _record_dtype(dim: int) -> np.dtype:
    """One remembered query: its time (float64), digest (uint64) and embedding (``dim`` float32),
    little-endian, packed."""
    return np.dtype([("time", "<f8"), ("digest", "<u8"), ("emb", "<f4", (dim,))])


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
        self._script = self._redis.register_script(_LUA)  # k-NN's, not Blacklight's
        self._dim: int | None = None
        self._scan = scan_kernel()  # the compiled single-query pass, None without numba

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
        """``HistoryStore.observe_unblocked`` in one round trip: the batch's script checks each client's block."""
        if k is None:
            raise TypeError("observe_unblocked needs k")
        return self._run(groups, k, now, window, True)

    def _run(self, groups, k, now, window, check_block):
        self._dim = check_call(groups, k, window, self._dim)
        if not groups:
            return [], []
        now = time.time() if now is None else float(now)
        rows = self.max_per_client if window is None else min(window, self.max_per_client)
        keys: list[str] = []
        args: list[Any] = [repr(now), repr(self.ttl_s), self.max_per_client, rows, int(check_block),
                           _record_dtype(self._dim).itemsize]
        for client, d, e in groups:
            keys += self._script_keys(client)
            args += [len(d), _records(now, d, e)]
        replies = self._script(keys=keys, args=args)  # one round trip for the batch
        ends, out = [], []
        for (_, d, e), reply in zip(groups, replies):
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
        hist = np.frombuffer(reply[2], dtype=_record_dtype(emb.shape[1]))[::-1]  # newest first: row i is count - i
        times, hist = hist["time"], hist["emb"]  # [M], [M, d]
        live = now - times <= self.ttl_s
        if emb.shape[0] == 1 and self._scan is not None and live.all():  # the usual call: one query, every row
            # seen (the script returned at most window and max_per_client rows): the in-process store's compiled pass
            rows = np.array(hist, order="C")  # writable and contiguous, as the compiled signature takes it
            self._scan(rows, np.einsum("md,md->m", rows, rows), _NO_DIGESTS, len(rows), 0, len(rows),
                       np.ascontiguousarray(emb[0]), np.uint64(0), out[0])
            return out
        r, lim = int((~retry).sum()), self.max_per_client
        # the j-th recorded query sees history row i while fewer than max_per_client queries were recorded
        # after it (i + j < lim) within ttl_s
        visible = (np.arange(len(times))[None, :] + np.arange(r)[:, None] < lim) & live[None, :]
        out[~retry] = neighbours(hist, visible, emb[~retry], k, window, lim)
        return out

    def stats(self) -> dict[str, int]:
        """``entries``: the records held (each client's query count, at most ``max_per_client``; those
        past ``ttl_s`` stay until overwritten or their keys expire, unseen)."""
        info = self._redis.info("memory")
        names = list(self._redis.scan_iter(match=f"{self.prefix}:*:n", count=1000))
        counts = [int(v) for v in self._redis.mget(names) if v is not None] if names else []
        return {"entries": sum(min(c, self.max_per_client) for c in counts), "clients": len(counts),
                "bytes": int(info["used_memory"])}
