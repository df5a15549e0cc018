"""The in-memory history store of the k-NN stateful detector (defenses/stateful/knn.py): each
client's recent queries as embeddings, bounded like Blacklight's store (defenses/stateful/store.py).

A store holds, per client, its recent queries: one 64-bit keyed digest of the exact input (retries
are recognised by it) and one embedding ``[d]`` float16. One call,
``observe(client, digests [N], embeddings [N, d], k, now) -> [N, k]``, scores and records a client's
queries in order (query ``i`` against the history including queries ``0..i-1``):

- a query whose digest equals a live remembered query of the same client (or an earlier query of
  the same call) is an exact retry: its row is all ``inf`` (no evidence), and it is not recorded;
- otherwise its row holds the l2 distances to its ``k`` nearest live earlier queries of the client,
  ascending, ``inf``-padded when the client has fewer than ``k``;
- then the query is recorded.

Bounds, with the semantics of :class:`~robustgate.defenses.stateful.store.MemoryStore`:
``max_entries`` remembered queries in all (an entry is live while fewer than ``max_entries``
queries were recorded after it, by any client: the oldest fall out first), ``max_per_client`` per
client (a client's oldest fall out first), ``ttl_s`` seconds, ``max_clients`` clients (the least
recently active is forgotten: LRU). Blocks and detection counts as MemoryStore's (``ClientFlags``).

Layout: per client, contiguous numpy buffers (embeddings ``[cap, d]`` float16, digests, times,
sequence numbers, the client's running index) whose live part is ``[start, end)``; they grow
geometrically and shrink when mostly dead. One global ring ``owner[max_entries]`` (uint32 client
ids, by sequence number) says whose entry each new query pushes out of the global bound, so dead
entries are dropped when they die, not when their client next calls: memory follows the live
entries (``stats()["bytes"]``; bench/results/stateful.cost.knn.md measures it at 1,000,000).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
import numpy as np
import torch

from robustgate.defenses.stateful.store import ClientFlags, HistoryStore

_MIN_CAP = 4  # rows a new client's buffers start with (many clients send a few queries)
_CLIENT_BYTES = 200  # the estimate of one client's Python objects (stats)


class _History:
    """One client's live queries: rows ``[start, end)`` of its buffers (module docstring)."""

    __slots__ = ("cid", "emb", "sq", "digest", "time", "seq", "cidx", "start", "end", "count")

    def __init__(self, cid: int, dim: int):
        self.cid, self.start, self.end, self.count = cid, 0, 0, 0  # count: queries recorded ever
        self._alloc(_MIN_CAP, dim)

    def _alloc(self, cap: int, dim: int) -> None:
        self.emb = np.zeros((cap, dim), dtype=np.float16)
        self.sq = np.zeros(cap, dtype=np.float32)  # squared norms of the rows (pairwise_l2)
        self.digest = np.zeros(cap, dtype=np.uint64)
        self.time = np.zeros(cap, dtype=np.float64)
        self.seq = np.zeros(cap, dtype=np.int64)
        self.cidx = np.zeros(cap, dtype=np.int64)

    @property
    def live(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.emb, self.sq, self.digest, self.time, self.seq, self.cidx))

    def _resize(self, cap: int) -> None:
        """Moves the live rows to the front of new buffers of ``cap`` rows (``cap >= live``)."""
        old = (self.emb, self.sq, self.digest, self.time, self.seq, self.cidx)
        s, e = self.start, self.end
        self._alloc(cap, self.emb.shape[1])
        for new, a in zip((self.emb, self.sq, self.digest, self.time, self.seq, self.cidx), old):
            new[:e - s] = a[s:e]
        self.start, self.end = 0, e - s

    def append(self, emb: np.ndarray, digest: np.ndarray, now: float, seq: np.ndarray) -> None:
        n = digest.shape[0]
        if self.end + n > self.emb.shape[0]:
            need = self.live + n
            cap = self.emb.shape[0]
            self._resize(max(_MIN_CAP, 2 * need) if need > cap // 2 else cap)
        sl = slice(self.end, self.end + n)
        self.emb[sl], self.digest[sl], self.time[sl], self.seq[sl] = emb, digest, now, seq
        e32 = emb.astype(np.float32)
        self.sq[sl] = (e32 * e32).sum(1)
        self.cidx[sl] = np.arange(self.count, self.count + n)
        self.end += n
        self.count += n

    def trim(self, min_seq: int, min_cidx: int, min_time: float) -> int:
        """Drops the oldest rows with ``seq < min_seq``, ``cidx < min_cidx`` or (a prefix of) those
        older than ``min_time``; returns how many were dropped."""
        s, e = self.start, self.end
        cut = max(int(np.searchsorted(self.seq[s:e], min_seq)), int(np.searchsorted(self.cidx[s:e], min_cidx)))
        old = self.time[s + cut:e] < min_time
        if old.any():
            cut += int(old.argmin()) if not old.all() else e - s - cut
        self.start += cut
        cap = self.emb.shape[0]
        if cap > 4 * _MIN_CAP and self.live < cap // 4:
            self._resize(max(_MIN_CAP, 2 * self.live))
        return cut


def pairwise_l2(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """``[N, d]`` x ``[M, d]`` (float16 or float32) -> ``[N, M]`` float32 Euclidean distances, computed in
    float32 as ``|a|^2 + |b|^2 - 2 a.b``; ``b_sq`` ``[M]``: the rows' squared norms when known. In
    torch, whose float16 -> float32 conversion and matrix product are several times faster than
    numpy's on a client's whole history (bench/stateful/cost.py --method knn)."""
    at = torch.from_numpy(np.ascontiguousarray(a)).float()  # [N, d]
    bt = torch.from_numpy(np.ascontiguousarray(b)).float()  # [M, d]
    sq_b = (bt * bt).sum(1) if b_sq is None else torch.from_numpy(b_sq)
    d2 = (at * at).sum(1)[:, None] + sq_b[None, :] - 2.0 * (at @ bt.T)  # [N, M]
    return d2.clamp_min_(0.0).sqrt_().numpy()


def k_smallest(d: np.ndarray, k: int) -> np.ndarray:
    """``[N, M]`` -> ``[N, k]``: each row's ``k`` smallest values ascending, ``inf``-padded."""
    n, m = d.shape
    if m > k:
        d = np.partition(d, k - 1, axis=1)[:, :k]
    elif m < k:
        d = np.concatenate([d, np.full((n, k - m), np.inf, dtype=d.dtype)], axis=1)
    return np.sort(d, axis=1)


class KnnMemoryStore(ClientFlags, HistoryStore):
    """In-process store of embeddings per client (module docstring). ``key``: the 16-byte secret of
    the retry digests (random per store)."""

    backend = "memory"

    def __init__(self, max_entries: int = 1_000_000, max_per_client: int = 10_000, max_clients: int = 100_000,
                 ttl_s: float = 3600.0, key: bytes | None = None):
        super().__init__(max_entries, max_per_client, max_clients, ttl_s)
        if key is not None and len(key) != 16:
            raise ValueError(f"key must be 16 bytes, got {len(key)}")
        self._key = key if key is not None else secrets.token_bytes(16)
        self._owner = np.zeros(max_entries, dtype=np.uint32)  # by seq % max_entries: the entry's client id
        self._clients: OrderedDict[str, _History] = OrderedDict()
        self._by_id: dict[int, _History] = {}
        self._next_client = 1
        self._seq = 0  # sequence number of the last recorded query (entries start at 1)
        self._held = 0  # live entries over all clients
        self._bytes = 0  # the clients' buffers and objects (stats; kept current, not summed per scrape)
        self._dim: int | None = None
        self._lock = threading.Lock()
        self._init_flags()

    def fingerprint_key(self) -> bytes:
        return self._key

    def clear(self) -> None:
        with self._lock:
            self._clients.clear()
            self._by_id.clear()
            self._blocks.clear()
            self._strikes.clear()
            self._held = 0
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": self._held, "clients": len(self._clients), "bytes": int(self._owner.nbytes + self._bytes)}

    def _client(self, client: str, dim: int) -> _History:
        h = self._clients.get(client)
        if h is not None:
            self._clients.move_to_end(client)
            return h
        h = self._clients[client] = self._by_id[self._next_client] = _History(self._next_client, dim)
        self._bytes += h.nbytes() + _CLIENT_BYTES
        self._next_client = (self._next_client % 0xFFFFFFFF) + 1
        while len(self._clients) > self.max_clients:
            _, gone = self._clients.popitem(last=False)
            self._by_id.pop(gone.cid, None)
            self._held -= gone.live
            self._bytes -= gone.nbytes() + _CLIENT_BYTES
        return h

    def observe(self, client: str, digests: np.ndarray, embeddings: np.ndarray, k: int,
                now: float | None = None) -> np.ndarray:
        """One client's queries (module docstring): digests ``[N]`` uint64, embeddings ``[N, d]`` ->
        ``[N, k]`` float32 distances to the ``k`` nearest live earlier queries (``inf``: none)."""
        return self.observe_batch([(client, digests, embeddings)], k, now)[0]

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]], k: int,
                      now: float | None = None) -> list[np.ndarray]:
        """:meth:`observe` for several clients, one after the other in the order given."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        for _, d, e in groups:
            if d.dtype != np.uint64 or d.ndim != 1:
                raise ValueError(f"digests must be [N] uint64, got {d.dtype} {d.shape}")
            if e.ndim != 2 or e.shape[0] != d.shape[0]:
                raise ValueError(f"embeddings must be [N, d] with N = {d.shape[0]}, got {e.shape}")
            if self._dim is not None and e.shape[1] != self._dim:
                raise ValueError(f"embeddings have {e.shape[1]} dimensions, this store holds {self._dim}")
            self._dim = self._dim or int(e.shape[1])
        now = time.time() if now is None else float(now)
        with self._lock:
            return [self._observe(self._client(c, e.shape[1]), d, e.astype(np.float16), k, now) for c, d, e in groups]

    def _live(self, h: _History, seq: int, count: int, now: float) -> np.ndarray:
        """``[live rows]`` bool: rows a query sees when ``seq`` queries were recorded in all and
        ``count`` by this client (global bound, per-client bound, TTL)."""
        s, e = h.start, h.end
        return ((h.seq[s:e] > seq - self.max_entries) & (count - h.cidx[s:e] <= self.max_per_client)
                & (now - h.time[s:e] <= self.ttl_s))

    def _observe(self, h: _History, digests: np.ndarray, emb: np.ndarray, k: int, now: float) -> np.ndarray:
        n, m = digests.shape[0], h.live
        # 1. which history rows each query sees: the same for the whole call unless a bound moves in it
        live0 = self._live(h, self._seq, h.count, now)
        moving = m and not np.array_equal(live0, self._live(h, self._seq + n, h.count + n, now))
        # 2. retries: a digest seen live in the history or recorded earlier in this call (and still
        # within the bounds: the r-th recorded query sees the call's j-th while r - j <= lim)
        lim = min(self.max_entries, self.max_per_client)
        hist = h.digest[h.start:h.end]
        in_hist = np.zeros(n, dtype=bool)  # [N] the digest is a live history entry's
        if m and not moving:
            live_d = hist[live0]
            # a comparison table for the usual small calls (np.isin sorts, costlier below ~10^6 pairs)
            in_hist = (live_d[:, None] == digests[None, :]).any(0) if n * m <= 1 << 20 else np.isin(digests, live_d)
        recorded = np.zeros(n, dtype=bool)
        seen: dict[int, int] = {}  # digest -> its index among the call's recorded queries
        r = 0
        rows = []
        for i, d in enumerate(digests.tolist()):
            live = self._live(h, self._seq + r, h.count + r, now) if moving else live0
            if (d in seen and r - seen[d] <= lim) or in_hist[i] or (moving and (live & (hist == np.uint64(d))).any()):
                continue
            recorded[i] = True
            seen[d] = r
            rows.append(live)
            r += 1
        # 3. distances to the history and to the earlier recorded queries of the call
        out = np.full((n, k), np.inf, dtype=np.float32)
        idx = np.flatnonzero(recorded)
        if idx.size:
            q = emb[idx]  # [R, d]
            gap = np.arange(idx.size)[:, None] - np.arange(idx.size)[None, :]  # [R, R] r - j
            if idx.size > 1:
                mine = pairwise_l2(q, q)  # [R, R]
                mine[~((gap > 0) & (gap <= lim))] = np.inf
            else:
                mine = np.full((1, 1), np.inf, dtype=np.float32)  # a query is not its own neighbour
            if m:
                dist = pairwise_l2(q, h.emb[h.start:h.end], h.sq[h.start:h.end])  # [R, m]
                dist[~(np.stack(rows) if moving else live0[None, :].repeat(idx.size, 0))] = np.inf
                dist = np.concatenate([dist, mine], axis=1)  # [R, m + R]
            else:
                dist = mine
            out[idx] = k_smallest(dist, k)
            # 4. record them, then drop what fell out of the bounds (this client's and the owners')
            seqs = np.arange(self._seq + 1, self._seq + 1 + idx.size, dtype=np.int64)
            self._bytes -= h.nbytes()
            h.append(q, digests[idx], now, seqs)
            self._bytes += h.nbytes()
            self._held += idx.size
            self._seq += idx.size
            ring = seqs % self.max_entries
            pushed = self._owner[ring][seqs > self.max_entries]  # owners of the entries pushed out
            self._owner[ring] = h.cid
            for cid in {h.cid, *np.unique(pushed).tolist()}:
                owner = self._by_id.get(cid)
                if owner is not None:
                    self._bytes -= owner.nbytes()
                    self._held -= owner.trim(self._seq - self.max_entries + 1,
                                             owner.count - self.max_per_client, now - self.ttl_s)
                    self._bytes += owner.nbytes()
        return out
