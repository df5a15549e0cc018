"""History stores of the stateful detectors: what each client sent recently, bounded.

A store holds, per client, the fingerprints of its recent queries: one 64-bit digest of the exact
input (retries are recognised by it) and ``k`` 64-bit content hashes. One call,
``observe(client, digests [N], hashes [N, k], now) -> [N]``, scores and records a client's queries
in order (query ``i`` is scored against the history including queries ``0..i-1``):

- a query whose digest equals a remembered live query of the same client is an exact retry: score
  0, and it is not recorded again;
- otherwise its score is ``max_e c(e)`` over the client's live entries ``e``, where ``c(e)`` counts
  the query's hashes whose most recent holder is ``e``. This is Blacklight's match count (the
  hashes a query shares with one stored query) where each hash points at the latest query that
  held it: it equals the paper's count for the most recent similar query and never exceeds it, so
  it detects a query attack (each query close to the previous one) as the paper does and can only
  lower a benign score. It lets the index keep one posting per hash.
- then the query is recorded.

Bounds (the constructor's keyword arguments, validated once): ``max_entries`` remembered queries in
all, ``max_per_client`` per client (a client's oldest fall out first), ``ttl_s`` seconds a query is
remembered, ``max_clients`` clients (the least recently active client is forgotten: LRU over
clients). ``stats()`` -> ``{entries, clients, bytes}`` for metrics.

Two implementations behind one interface:

- :class:`MemoryStore`: preallocated numpy arrays, no Python object per query (only per client).
  Entries live in a ring of ``2**ceil(log2(max_entries))`` slots (oldest overwritten first); the
  index is a set-associative table of ``8``-way buckets, each way a 16-bit tag and the 32-bit
  sequence number of the entry holding the hash; a full bucket drops its oldest posting. Every
  posting is checked against the entry it names (same client, still live, digest equal for retry
  postings), so a stale or colliding posting can only fail to count, except that a 16-bit tag
  collision inside one bucket (probability 8 / 65536 per hash) may add 1 to a count.
- :class:`RedisStore`: the same rule in one Lua script call per batch (all its clients, their
  block check included: one round trip), so replicas behind one Service share a client's stream
  and an attacker spread over pods by the load balancer is seen whole. Keys per client share a
  hash tag (``rg:sd:{client}:...``) and expire after ``ttl_s`` of inactivity; a batch's script
  names several clients' keys, so the store needs one Redis server (or a replicated primary), not
  Redis Cluster; ``max_per_client`` is enforced by the script; the global bound is
  Redis's own ``maxmemory`` with ``maxmemory-policy allkeys-lru`` (set it on the server:
  ``max_entries``/``max_clients`` are not enforced there).

Integration: the proxy builds the store once (``build_store(config)``) and keeps the object across
config reloads, handing it to each new detector, so a reload never forgets an attacker's history.
The fingerprint key comes from the store (``fingerprint_key()``): random per MemoryStore, shared
through Redis (created once with SET NX) so every replica hashes alike.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np

WAYS = 8  # postings per index bucket
_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant: spreads client ids over the key space
MAX_STRIKES = 1024  # a client's detections kept for block_window (more than any block_after needs)
_DIGEST_DOMAIN = np.uint64(0xD1B54A32D192ED03)  # separates retry postings from content postings


def _check_bounds(max_entries: int, max_per_client: int, max_clients: int, ttl_s: float) -> None:
    for name, value in (("max_entries", max_entries), ("max_per_client", max_per_client), ("max_clients", max_clients)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_entries >= 2**31:
        raise ValueError(f"max_entries must be below 2**31, got {max_entries}")
    if max_per_client > max_entries:
        raise ValueError(f"max_per_client ({max_per_client}) must not exceed max_entries ({max_entries})")
    if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")


def _check_observe(digests: np.ndarray, hashes: np.ndarray) -> None:
    if digests.dtype != np.uint64 or digests.ndim != 1:
        raise ValueError(f"digests must be [N] uint64, got {digests.dtype} {digests.shape}")
    if hashes.dtype != np.uint64 or hashes.ndim != 2 or hashes.shape[0] != digests.shape[0]:
        raise ValueError(f"hashes must be [N, k] uint64 with N = {digests.shape[0]}, got {hashes.dtype} {hashes.shape}")


class HistoryStore(ABC):
    """Bounded per-client query history (see the module docstring)."""

    backend: str

    def __init__(self, max_entries: int = 1_000_000, max_per_client: int = 10_000, max_clients: int = 100_000,
                 ttl_s: float = 3600.0):
        _check_bounds(max_entries, max_per_client, max_clients, ttl_s)
        self.max_entries, self.max_per_client, self.max_clients = max_entries, max_per_client, max_clients
        self.ttl_s = float(ttl_s)

    def config(self) -> dict[str, Any]:
        return {"backend": self.backend, "max_entries": self.max_entries, "max_per_client": self.max_per_client,
                "max_clients": self.max_clients, "ttl_s": self.ttl_s}

    @abstractmethod
    def observe(self, client: str, digests: np.ndarray, hashes: np.ndarray, now: float | None = None) -> np.ndarray:
        """Scores and records one client's queries in order: digests ``[N]`` uint64, hashes ``[N, k]``
        uint64 (0 = no hash) -> ``[N]`` int64 match counts (0 for an exact retry)."""

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]],
                      now: float | None = None) -> list[np.ndarray]:
        """:meth:`observe` for several clients' queries ``[(client, digests [N_c], hashes [N_c, k]), ...]``,
        clients in the order given -> one ``[N_c]`` score array per group. Same scores and state as
        calling ``observe`` group after group (a store may do it in fewer steps)."""
        return [self.observe(client, d, h, now) for client, d, h in groups]

    def observe_unblocked(self, groups: list[tuple[str, np.ndarray, np.ndarray]], now: float | None = None,
                          **kwargs) -> tuple[list[float | None], list[np.ndarray | None]]:
        """The stateful stage's step on a batch (defenses/pipeline.py ``observe_clients``): the groups'
        clients' block ends at ``now`` (:meth:`blocked_many`), then :meth:`observe_batch` (with
        ``kwargs``: k-NN's ``k`` and ``window``) of the groups whose client is not blocked ->
        ``(ends [G], results [G])``, a blocked group's result None (its queries are not recorded).
        A store behind a connection answers it in one round trip (``RemoteStore``)."""
        now = time.time() if now is None else float(now)
        ends = self.blocked_many([client for client, _, _ in groups], now)
        live = [g for g, end in zip(groups, ends) if end is None]
        got = iter(self.observe_batch(live, now=now, **kwargs) if live else ())
        return ends, [next(got) if end is None else None for end in ends]

    @abstractmethod
    def fingerprint_key(self) -> bytes:
        """The 16-byte secret key the fingerprints are computed under (stable for this store)."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """``{entries, clients, bytes}``: queries held, clients held, memory estimate in bytes."""

    @abstractmethod
    def clear(self) -> None:
        """Forgets every client."""

    @abstractmethod
    def block(self, client: str, until: float) -> None:
        """Blocks ``client`` until the wall-clock time ``until`` (seconds since the epoch; a later
        block extends an earlier one). The stateful stage's ``block`` action (defenses/pipeline.py)."""

    @abstractmethod
    def blocked_until(self, client: str, now: float | None = None) -> float | None:
        """When ``client``'s block ends, or None when it is not blocked at ``now`` (default: now)."""

    def blocked_many(self, clients: list[str], now: float | None = None) -> list[float | None]:
        """:meth:`blocked_until` for each of ``clients`` (a pipeline batch's, in one call: a shared
        store answers them in one round trip)."""
        now = time.time() if now is None else float(now)
        return [self.blocked_until(c, now) for c in clients]

    @abstractmethod
    def add_detections(self, client: str, n: int, now: float | None = None, window: int | None = None) -> int:
        """Adds ``n`` detections of ``client``'s latest query (the ``block`` action's ``block_after``)
        and returns its count: with ``window``, its detections among its last ``window`` recorded
        queries (the n new ones at its current query count); without, every detection until
        ``ttl_s`` after the client's last one."""


class ClientFlags:
    """The in-process blocks and detection counts of a store (``block``, ``blocked_until``,
    ``add_detections`` of :class:`HistoryStore`), shared by the in-memory stores: needs ``_lock``,
    ``ttl_s`` and ``max_clients``; call :meth:`_init_flags` in the constructor."""

    def _init_flags(self) -> None:
        self._blocks: dict[str, float] = {}  # client -> block end (epoch seconds); at most max_clients
        # client -> [detections, last one's time, the client's query count at each detection (window)]
        self._strikes: OrderedDict[str, list] = OrderedDict()

    def _queries(self, client: str) -> int:
        """How many queries of ``client`` the store has recorded (0 for one it does not know)."""
        raise NotImplementedError

    def add_detections(self, client: str, n: int, now: float | None = None, window: int | None = None) -> int:
        now = time.time() if now is None else float(now)
        with self._lock:
            rec = self._strikes.pop(client, None)
            if rec is None or now - rec[1] > self.ttl_s:
                rec = [0, now, []]
            rec[0] += int(n)
            rec[1] = now
            if window is not None:
                at = self._queries(client)
                rec[2] = [q for q in rec[2] if q > at - window][-MAX_STRIKES:] + [at] * int(n)
            self._strikes[client] = rec  # most recent last
            while len(self._strikes) > self.max_clients:
                self._strikes.popitem(last=False)
            return len(rec[2]) if window is not None else int(rec[0])

    def block(self, client: str, until: float) -> None:
        with self._lock:
            self._blocks[client] = max(float(until), self._blocks.get(client, 0.0))
            if len(self._blocks) > self.max_clients:  # bounded like the histories: expired ones first, then oldest
                now = time.time()
                for c in [c for c, t in self._blocks.items() if t <= now]:
                    del self._blocks[c]
                while len(self._blocks) > self.max_clients:
                    del self._blocks[next(iter(self._blocks))]

    def blocked_many(self, clients: list[str], now: float | None = None) -> list[float | None]:
        if not self._blocks:  # the usual case: nobody is blocked
            return [None] * len(clients)
        return HistoryStore.blocked_many(self, clients, now)

    def blocked_until(self, client: str, now: float | None = None) -> float | None:
        until = self._blocks.get(client)
        if until is None:
            return None
        if until <= (time.time() if now is None else now):
            with self._lock:
                if self._blocks.get(client) == until:
                    del self._blocks[client]
            return None
        return until


class MemoryStore(ClientFlags, HistoryStore):
    """In-process history store (numpy arrays; see the module docstring)."""

    backend = "memory"
    holds = "hashes"  # what a query is remembered as (the detector checks it can use the store)

    def __init__(self, max_entries: int = 1_000_000, max_per_client: int = 10_000, max_clients: int = 100_000,
                 ttl_s: float = 3600.0, hashes_per_query: int = 20, key: bytes | None = None):
        super().__init__(max_entries, max_per_client, max_clients, ttl_s)
        if not isinstance(hashes_per_query, int) or hashes_per_query < 1:
            raise ValueError(f"hashes_per_query must be a positive integer, got {hashes_per_query!r}")
        if key is not None and len(key) != 16:
            raise ValueError(f"key must be 16 bytes, got {len(key)}")
        self.hashes_per_query = hashes_per_query
        self._key = key if key is not None else secrets.token_bytes(16)
        # entry ring: slot = seq & (cap - 1); cap a power of two so the mapping survives seq's 2**32 wrap
        self._cap = 1 << max(1, math.ceil(math.log2(max_entries)))
        self._e_seq = np.zeros(self._cap, dtype=np.uint32)
        self._e_client = np.zeros(self._cap, dtype=np.uint32)  # client ids start at 1: 0 = empty
        self._e_cidx = np.zeros(self._cap, dtype=np.uint32)  # the client's own running index
        self._e_time = np.zeros(self._cap, dtype=np.float64)
        self._e_digest = np.zeros(self._cap, dtype=np.uint64)
        # index: about 1.5 slots per posting (k hashes + 1 digest per entry)
        postings = max_entries * (hashes_per_query + 1)
        self._buckets = 1 << max(1, math.ceil(math.log2(1.5 * postings / WAYS)))
        self._tags = np.zeros((self._buckets, WAYS), dtype=np.uint16)
        self._p_seq = np.zeros((self._buckets, WAYS), dtype=np.uint32)
        self._clients: OrderedDict[str, list[int]] = OrderedDict()  # client -> [id, queries recorded]
        self._next_client = 1
        self._seq = 0  # last sequence number used (uint32 arithmetic)
        self._inserted = 0
        self._lock = threading.Lock()  # observe() from several worker threads is serialised
        self._init_flags()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hashes_per_query": self.hashes_per_query}

    def _queries(self, client: str) -> int:
        rec = self._clients.get(client)
        return 0 if rec is None else int(rec[1])

    def fingerprint_key(self) -> bytes:
        return self._key

    def clear(self) -> None:
        with self._lock:
            self._clients.clear()  # entries of forgotten client ids never match again
            self._blocks.clear()
            self._strikes.clear()
            self._inserted = 0

    def stats(self) -> dict[str, int]:
        arrays = (self._e_seq, self._e_client, self._e_cidx, self._e_time, self._e_digest, self._tags, self._p_seq)
        return {"entries": min(self._inserted, self.max_entries), "clients": len(self._clients),
                "bytes": int(sum(a.nbytes for a in arrays) + 200 * len(self._clients))}

    def _client(self, client: str) -> list[int]:
        rec = self._clients.get(client)
        if rec is None:
            rec = self._clients[client] = [self._next_client, 0]
            self._next_client = (self._next_client % 0xFFFFFFFF) + 1
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return rec

    def _live(self, seqs: np.ndarray, cid: int, count: int, now: float) -> np.ndarray:
        """``[M]`` bool: the postings' entries exist, belong to client ``cid`` and are within the bounds."""
        slots = seqs & np.uint32(self._cap - 1)
        age = (np.uint32(self._seq) - seqs).astype(np.uint32)  # entries inserted since, mod 2**32
        return ((self._e_seq[slots] == seqs) & (self._e_client[slots] == cid) & (seqs != 0)
                & (age < self.max_entries)
                & ((count - self._e_cidx[slots].astype(np.int64)) <= self.max_per_client)
                & (now - self._e_time[slots] <= self.ttl_s))

    def observe(self, client: str, digests: np.ndarray, hashes: np.ndarray, now: float | None = None) -> np.ndarray:
        return self.observe_batch([(client, digests, hashes)], now)[0]

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]],
                      now: float | None = None) -> list[np.ndarray]:
        for _, d, h in groups:
            _check_observe(d, h)
        now = time.time() if now is None else float(now)
        with self._lock:
            recs = [self._client(client) for client, _, _ in groups]  # what one-by-one calls would do first
            if sum(d.shape[0] for _, d, _ in groups) > 1:
                from robustgate.defenses.stateful.batch import observe_vectorised  # it reads this module's constants

                fast = observe_vectorised(self, recs, groups, now)  # defenses/stateful/batch.py
                if fast is not None:
                    return fast
            return [self._observe(rec, d, h, now) for rec, (_, d, h) in zip(recs, groups)]

    def _observe(self, rec: list[int], digests: np.ndarray, hashes: np.ndarray, now: float) -> np.ndarray:
        """One client's queries, one at a time (the reference rule; ``rec`` = ``[client id, queries recorded]``)."""
        cid = rec[0]
        mix = np.uint64((cid * _MIX) & 0xFFFFFFFFFFFFFFFF)
        scores = np.zeros(digests.shape[0], dtype=np.int64)
        for i in range(digests.shape[0]):
            # 1. exact retry? the digest's posting must name a live entry with the same digest
            dkey = np.array([digests[i] ^ _DIGEST_DOMAIN ^ mix], dtype=np.uint64)
            db, dt = self._locate(dkey)
            hit = self._p_seq[db[0]][self._tags[db[0]] == dt[0]]
            if hit.size:
                live = self._live(hit, cid, rec[1], now)
                if (live & (self._e_digest[hit & np.uint32(self._cap - 1)] == digests[i])).any():
                    continue  # score 0, not recorded again
            # 2. match count against the most recent holder of each hash
            h = hashes[i][hashes[i] != 0]
            keys = h ^ mix
            b, t = self._locate(keys)
            match = self._tags[b] == t[:, None]  # [k, WAYS]
            cand = self._p_seq[b][match]  # a hash present twice in one bucket (tag collision) counts twice
            cand = cand[self._live(cand, cid, rec[1], now)]
            if cand.size:
                scores[i] = int(np.unique(cand, return_counts=True)[1].max())
            # 3. record the query: a new entry and its k + 1 postings
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            seq = np.uint32(self._seq)
            slot = self._seq & (self._cap - 1)
            self._e_seq[slot], self._e_client[slot], self._e_cidx[slot] = seq, cid, rec[1]
            self._e_time[slot], self._e_digest[slot] = now, digests[i]
            rec[1] += 1
            self._inserted += 1
            self._post(np.concatenate([keys, dkey]), seq)
        return scores

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[M]`` uint64 keys -> bucket ``[M]`` int64 and 16-bit tag ``[M]``. The keys are mixed first
        (murmur3's finaliser step, a bijection), so keys that differ only in some bits differ in both."""
        keys = keys * np.uint64(0xFF51AFD7ED558CCD)
        keys ^= keys >> np.uint64(33)
        bucket = (keys & np.uint64(self._buckets - 1)).astype(np.int64)
        tag = (keys >> np.uint64(48)).astype(np.uint16)
        return bucket, tag

    def _post(self, keys: np.ndarray, seq: np.uint32) -> None:
        """Points each key at entry ``seq``: the way with the same tag, else the oldest way."""
        b, t = self._locate(keys)
        if np.unique(b).size < b.size:  # two keys in one bucket would pick the same way: one at a time
            for i in range(b.size):
                self._write(b[i:i + 1], t[i:i + 1], seq)
            return
        self._write(b, t, seq)

    def _write(self, b: np.ndarray, t: np.ndarray, seq, ref=None) -> None:
        """Postings ``(bucket b [M], tag t [M]) -> seq`` (one uint32, or ``[M]``) for ``M`` distinct
        buckets. The way: the one with the same tag, else the oldest, ages counted back from ``ref``
        (default ``seq``; the vectorised path passes its batch's last sequence number)."""
        ref = np.uint32(seq if ref is None else ref)
        same = self._tags[b] == t[:, None]  # [M, WAYS]
        age = (ref - self._p_seq[b]).astype(np.uint32)  # empty ways (seq 0) are the oldest
        way = np.where(same.any(1), same.argmax(1), age.argmax(1))
        self._tags[b, way] = t
        self._p_seq[b, way] = seq


_LUA = """
-- One call for a batch's G clients. KEYS: per client 4: postings hash (field -> entry seq), entries hash
--   (seq -> "time digest h1 .. hk"), counter, block (its end, epoch seconds)
-- ARGV: now, ttl_s, max_per_client, k, check the blocks (0/1), then per client: n and n groups of
--   (digest, h1 .. hk) as hex
-- returns per client {"b", block end} when blocked (nothing recorded), else its [n] scores
local now, ttl, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local k, check = tonumber(ARGV[4]), ARGV[5] == '1'
local ms, pos, replies = math.ceil(ttl * 1000), 6, {}
for g = 1, #KEYS / 4 do
  local kp, ke, kn, kb = KEYS[4 * g - 3], KEYS[4 * g - 2], KEYS[4 * g - 1], KEYS[4 * g]
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  local b = check and redis.call('GET', kb)
  if b and tonumber(b) > now then
    replies[g] = {'b', b}
    pos = pos + n * (1 + k)
  else
    local scores = {}
    local cur = tonumber(redis.call('GET', kn) or '0')
    local function entry(seq)  -- the live entry's fields or nil
      if not seq then return nil end
      local s = tonumber(seq)
      if cur - s >= maxc then return nil end
      local e = redis.call('HGET', ke, seq)
      if not e then return nil end
      local f = {}
      for w in string.gmatch(e, '%S+') do f[#f + 1] = w end
      if now - tonumber(f[1]) > ttl then return nil end
      return f
    end
    for i = 1, n do
      local digest, hs = ARGV[pos], {}
      for j = 1, k do if ARGV[pos + j] ~= '0000000000000000' then hs[#hs + 1] = ARGV[pos + j] end end
      pos = pos + 1 + k
      local d = entry(redis.call('HGET', kp, 'd' .. digest))
      if d and d[2] == digest then
        scores[i] = 0
      else
        local best, counts, live = 0, {}, {}
        if #hs > 0 then
          local seqs = redis.call('HMGET', kp, unpack(hs))
          for j = 1, #hs do
            local s = seqs[j]
            if s then
              if live[s] == nil then live[s] = entry(s) ~= nil end
              if live[s] then
                counts[s] = (counts[s] or 0) + 1
                if counts[s] > best then best = counts[s] end
              end
            end
          end
        end
        scores[i] = best
        cur = redis.call('INCR', kn)
        redis.call('HSET', ke, cur, string.format('%.6f', now) .. ' ' .. digest .. ' ' .. table.concat(hs, ' '))
        redis.call('HSET', kp, 'd' .. digest, cur)
        for j = 1, #hs do redis.call('HSET', kp, hs[j], cur) end
        -- the client's query that falls out of max_per_client: drop it and the postings still naming it
        local old = cur - maxc
        if old >= 1 then
          local e = redis.call('HGET', ke, old)
          if e then
            local f, j = {}, 0
            for w in string.gmatch(e, '%S+') do
              j = j + 1
              if j >= 2 then f[#f + 1] = (j == 2) and ('d' .. w) or w end
            end
            for _, field in ipairs(f) do
              if redis.call('HGET', kp, field) == tostring(old) then redis.call('HDEL', kp, field) end
            end
            redis.call('HDEL', ke, old)
          end
        end
      end
    end
    redis.call('PEXPIRE', kp, ms)
    redis.call('PEXPIRE', ke, ms)
    redis.call('PEXPIRE', kn, ms)
    replies[g] = scores
  end
end
return replies
"""


# add_detections with a window, atomically: KEYS[1] the client's detections (a list of its query counts,
# newest first), KEYS[2] its query count; ARGV: n, window, ttl ms, the most kept -> detections in the window
_DETECT_LUA = """
local at = tonumber(redis.call('GET', KEYS[2]) or '0')
local n, window = tonumber(ARGV[1]), tonumber(ARGV[2])
for _ = 1, n do redis.call('LPUSH', KEYS[1], at) end
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[4]) - 1)
local kept = redis.call('LRANGE', KEYS[1], 0, -1)
local count = 0
for _, q in ipairs(kept) do
  if tonumber(q) > at - window then count = count + 1 else break end
end
redis.call('LTRIM', KEYS[1], 0, math.max(count, 1) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return count
"""


class RedisStore(HistoryStore):
    """History shared by every replica through one Redis server (see the module docstring).

    ``url``: ``redis://host:port/db`` (``rediss://`` for TLS); ``prefix`` namespaces the keys."""

    backend = "redis"
    holds = "hashes"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", max_entries: int = 1_000_000,
                 max_per_client: int = 10_000, max_clients: int = 100_000, ttl_s: float = 3600.0,
                 prefix: str = "rg:sd", socket_timeout_s: float = 0.5):
        super().__init__(max_entries, max_per_client, max_clients, ttl_s)
        import redis  # the optional extra robustgate[redis]

        if not prefix or any(c in prefix for c in "{} "):
            raise ValueError(f"prefix must be non-empty without braces or spaces, got {prefix!r}")
        self.url, self.prefix, self.socket_timeout_s = url, prefix, float(socket_timeout_s)
        self._redis = redis.Redis.from_url(url, socket_timeout=self.socket_timeout_s,
                                           socket_connect_timeout=self.socket_timeout_s)
        self._script = self._redis.register_script(_LUA)
        self._detect_script = self._redis.register_script(_DETECT_LUA)
        self._key: bytes | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "url": self.url, "prefix": self.prefix, "socket_timeout_s": self.socket_timeout_s}

    def _keys(self, client: str) -> list[str]:
        tag = client.replace("{", "(").replace("}", ")")  # braces would break the hash tag
        return [f"{self.prefix}:{{{tag}}}:p", f"{self.prefix}:{{{tag}}}:e", f"{self.prefix}:{{{tag}}}:n"]

    def _block_key(self, client: str) -> str:
        return self._keys(client)[0][:-2] + ":b"

    def _script_keys(self, client: str) -> list[str]:
        """A client's keys as the observing scripts take them: its three, then its block key."""
        return self._keys(client) + [self._block_key(client)]

    def block(self, client: str, until: float) -> None:
        # the key expires with the block; a shorter new block never shortens a longer one (GT)
        ms = max(1, int(math.ceil((float(until) - time.time()) * 1000)))
        name = self._block_key(client)
        old = self._redis.get(name)
        if old is None or float(old) < until:
            self._redis.set(name, repr(float(until)), px=ms)

    def add_detections(self, client: str, n: int, now: float | None = None, window: int | None = None) -> int:
        if window is not None:  # the client's detections at its query counts (KEYS[3]), the old ones trimmed
            keys = self._keys(client)
            return int(self._detect_script(keys=[keys[0][:-2] + ":w", keys[2]],
                                           args=[int(n), int(window), int(math.ceil(self.ttl_s * 1000)), MAX_STRIKES]))
        name = self._keys(client)[0][:-2] + ":s"
        pipe = self._redis.pipeline()
        pipe.incrby(name, int(n))
        pipe.pexpire(name, int(math.ceil(self.ttl_s * 1000)))
        return int(pipe.execute()[0])

    def blocked_until(self, client: str, now: float | None = None) -> float | None:
        return self.blocked_many([client], now)[0]

    def blocked_many(self, clients: list[str], now: float | None = None) -> list[float | None]:
        """One MGET for a batch's clients (one round trip, not one per client)."""
        if not clients:
            return []
        now = time.time() if now is None else float(now)
        values = self._redis.mget([self._block_key(c) for c in clients])
        return [None if v is None or float(v) <= now else float(v) for v in values]

    def fingerprint_key(self) -> bytes:
        if self._key is None:
            name = f"{self.prefix}:key"
            self._redis.set(name, secrets.token_hex(16), nx=True)  # the first replica's key wins
            self._key = bytes.fromhex(self._redis.get(name).decode())
        return self._key

    def observe(self, client: str, digests: np.ndarray, hashes: np.ndarray, now: float | None = None) -> np.ndarray:
        return self.observe_batch([(client, digests, hashes)], now)[0]

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]],
                      now: float | None = None) -> list[np.ndarray]:
        """:meth:`HistoryStore.observe_batch` in one round trip (one script call for the batch's clients)."""
        return self._run(groups, now, False)[1]

    def observe_unblocked(self, groups: list[tuple[str, np.ndarray, np.ndarray]], now: float | None = None,
                          **kwargs) -> tuple[list[float | None], list[np.ndarray | None]]:
        """:meth:`HistoryStore.observe_unblocked` in one round trip: the script checks each client's block."""
        if kwargs:
            raise TypeError(f"observe_unblocked takes (groups, now), got {sorted(kwargs)}")
        return self._run(groups, now, True)

    def _run(self, groups, now, check_block) -> tuple[list[float | None], list[np.ndarray | None]]:
        for _, d, h in groups:
            _check_observe(d, h)
        if not groups:
            return [], []
        now = time.time() if now is None else float(now)
        k = groups[0][2].shape[1]
        if any(h.shape[1] != k for _, _, h in groups):
            raise ValueError(f"hashes must have the same k in one call, got "
                             f"{sorted({h.shape[1] for _, _, h in groups})}")
        keys: list[str] = []
        args: list[Any] = [repr(now), repr(self.ttl_s), self.max_per_client, k, int(check_block)]
        for client, digests, hashes in groups:
            keys += self._script_keys(client)
            args.append(len(digests))
            for i in range(len(digests)):
                args.append(f"{int(digests[i]):016x}")
                args.extend(f"{int(h):016x}" for h in hashes[i])
        ends, out = [], []
        for (_, digests, _), reply in zip(groups, self._script(keys=keys, args=args)):
            blocked = bool(reply) and reply[0] == b"b"
            ends.append(float(reply[1]) if blocked else None)
            out.append(None if blocked else np.asarray(reply, dtype=np.int64).reshape(len(digests)))
        return ends, out

    def stats(self) -> dict[str, int]:
        """Counts the clients' keys: one SCAN page and one pipelined HLEN per 1,000 clients (not a round
        trip per client; the metrics read it off the event loop, proxy/metrics.py StoreStats)."""
        info = self._redis.info("memory")
        entries = clients = 0
        cursor = None
        while cursor != 0:
            cursor, names = self._redis.scan(cursor or 0, match=f"{self.prefix}:*:e", count=1000)
            if names:
                pipe = self._redis.pipeline(transaction=False)
                for name in names:
                    pipe.hlen(name)
                lengths = pipe.execute()
                clients += len(names)
                entries += sum(int(v) for v in lengths)
        return {"entries": entries, "clients": clients, "bytes": int(info["used_memory"])}

    def clear(self) -> None:
        for name in self._redis.scan_iter(match=f"{self.prefix}:{{*", count=1000):
            self._redis.delete(name)


def build_store(config: dict[str, Any] | None = None) -> HistoryStore:
    """The store a config names: ``{backend: memory | redis, ...bounds, url, prefix}`` (``kind`` is
    accepted for ``backend``, as the pipeline's ``store:`` section spells it)."""
    config = dict(config or {})
    if "kind" in config and "backend" in config:
        raise ValueError("store: give kind or backend, not both")
    backend = config.pop("kind", None) or config.pop("backend", "memory")
    kinds = {"memory": MemoryStore, "redis": RedisStore}
    if backend not in kinds:
        raise ValueError(f"store.backend must be one of {sorted(kinds)}, got {backend!r}")
    try:
        return kinds[backend](**config)
    except TypeError as exc:
        raise ValueError(f"store ({backend}): {exc}") from exc


def store_kind(spec: dict[str, Any] | None) -> str:
    """The backend a stage's ``store:`` section names (``kind``, or its older spelling ``backend``):
    ``memory`` (the default) or ``redis``."""
    spec = spec or {}
    return spec.get("kind", spec.get("backend", "memory"))


def store_for(method: str, spec: dict[str, Any], top_k: int = 20, origin: str = "") -> HistoryStore:
    """The history store a stage of ``method`` needs, from its ``store:`` section ``spec``
    (``{kind: memory | redis, ...bounds}``): Blacklight's hash store (``top_k`` hashes per query, in
    memory or Redis) or the k-NN embedding store (in memory or Redis; ``origin``: what the embeddings
    come from -- method and encoder sha256 --, which namespaces the Redis keys). ValueError naming the bad key."""
    from robustgate.defenses.stateful.knn_redis import KnnRedisStore  # they import this module
    from robustgate.defenses.stateful.knn_store import KnnMemoryStore

    spec = dict(spec)
    backend = store_kind(spec)
    if method == "knn":
        kinds = {"memory": KnnMemoryStore, "redis": KnnRedisStore}
        if backend not in kinds:
            raise ValueError(f"store.kind must be one of {sorted(kinds)}, got {backend!r}")
        spec.pop("kind", None)
        spec.pop("backend", None)
        if backend == "redis" and origin:
            spec.setdefault("namespace", hashlib.sha256(origin.encode()).hexdigest()[:16])
        try:
            return kinds[backend](**spec)
        except TypeError as exc:
            raise ValueError(f"store ({backend}, method knn): {exc}") from exc
    if backend == "memory":
        spec.setdefault("hashes_per_query", top_k)
    return build_store(spec)
