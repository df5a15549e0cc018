"""The in-memory history store of the k-NN stateful detector (defenses/stateful/knn.py): each
client's recent queries as embeddings, bounded like Blacklight's store (defenses/stateful/store.py).

A store holds, per client, its recent queries: one 64-bit keyed digest of the exact input (retries
are recognised by it) and one embedding ``[d]`` float32. One call,
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
recently active is forgotten: LRU). The TTL drops rows when a client's rows are trimmed (after each
call that records its queries, or pushes its entries out of the global bound): a row dropped for its
age stays dropped if the clock later steps back. Blocks and detection counts as MemoryStore's (``ClientFlags``).

Layout: per client, contiguous numpy buffers (embeddings ``[cap, d]`` float32, digests, times,
sequence numbers, the client's running index) whose live part is ``[start, end)``; they grow
geometrically and shrink when mostly dead. Sequence numbers and running indices grow along the rows,
and so do the times unless the clock stepped back: then the rows a query sees are a suffix of the
live part, found by binary search (a clock step back leaves that client on a per-row mask until its
history empties). One global ring ``owner[max_entries]`` (uint32 client
ids, by sequence number) says whose entry each new query pushes out of the global bound, so dead
entries are dropped when they die, not when their client next calls: memory follows the live
entries (``stats()["bytes"]``; bench/results/stateful.cost.knn.md measures it at 1,000,000).

The rows are float32, not float16: a query is compared with its client's whole history, and
converting a few thousand float16 rows to float32 for the product cost more than the product
itself (bench/results/stateful.stage_cpu.md); float32 costs 4 more bytes per dimension per entry
(with the buffers' growth below, 180 MiB per 1,000,000 entries of 32 dimensions:
bench/results/stateful.cost.knn.md). Where numba is installed, a client's queries of a call (one,
the usual call: a batch's items come from different clients; or several: a client with several
requests in one batch) take a shorter path than the general one, to the same result: one compiled
call (:func:`step_kernel`) that, query after query, finds the first live row, scans the client's
rows once (:func:`scan_kernel`) and writes the query as a row. Without numba one query takes a numpy
pass; the general, vectorised path serves several, and histories whose clock stepped back.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections import OrderedDict
import numpy as np

from robustgate.defenses.stateful.kernels import compile_kernel
from robustgate.defenses.stateful.store import ClientFlags, HistoryStore

_MIN_CAP = 4  # rows a new client's buffers start with (many clients send a few queries)
_GROWTH = 1.25  # a full client's buffers grow to this many times the rows they need: ~89% full on average
# (2x left a third of the rows of the cost bench's 1,000-query clients empty); each row is copied ~4 times over its life,
# against the ~4,000 rows every query of the client reads
_CLIENT_BYTES = 200  # the estimate of one client's Python objects (stats)


class _History:
    """One client's live queries: rows ``[start, end)`` of its buffers (module docstring).
    ``monotone``: the rows' times never decrease (then the rows a query sees are a suffix)."""

    __slots__ = ("cid", "emb", "sq", "digest", "time", "seq", "cidx", "start", "end", "count", "bytes", "monotone")

    def __init__(self, cid: int, dim: int):
        self.cid, self.start, self.end, self.count = cid, 0, 0, 0  # count: queries recorded ever
        self.monotone = True
        self._alloc(_MIN_CAP, dim)

    def _alloc(self, cap: int, dim: int) -> None:
        self.emb = np.zeros((cap, dim), dtype=np.float32)
        self.sq = np.zeros(cap, dtype=np.float32)  # squared norms of the rows (pairwise_l2)
        self.digest = np.zeros(cap, dtype=np.uint64)
        self.time = np.zeros(cap, dtype=np.float64)
        self.seq = np.zeros(cap, dtype=np.int64)
        self.cidx = np.zeros(cap, dtype=np.int64)
        self.bytes = sum(a.nbytes for a in (self.emb, self.sq, self.digest, self.time, self.seq, self.cidx))

    @property
    def live(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        return self.bytes

    def _resize(self, cap: int) -> None:
        """Moves the live rows to the front of new buffers of ``cap`` rows (``cap >= live``)."""
        old = (self.emb, self.sq, self.digest, self.time, self.seq, self.cidx)
        s, e = self.start, self.end
        self._alloc(cap, self.emb.shape[1])
        for new, a in zip((self.emb, self.sq, self.digest, self.time, self.seq, self.cidx), old):
            new[:e - s] = a[s:e]
        self.start, self.end = 0, e - s

    def append(self, emb: np.ndarray, digest: np.ndarray, now: float, seq: np.ndarray | int) -> None:
        """Records ``[n]`` rows with sequence numbers ``seq`` ``[n]`` (an int when ``n`` is 1)."""
        n = digest.shape[0]
        self.reserve(n)
        self.note_time(now)
        if n == 1:  # the usual call: scalar writes (a slice assignment costs ~1 µs each)
            i = self.end
            self.emb[i], self.digest[i], self.time[i], self.seq[i] = emb[0], digest[0], now, seq
            self.sq[i] = np.einsum("d,d->", emb[0], emb[0])
            self.cidx[i] = self.count
        else:
            sl = slice(self.end, self.end + n)
            self.emb[sl], self.digest[sl], self.time[sl], self.seq[sl] = emb, digest, now, seq
            self.sq[sl] = np.einsum("nd,nd->n", emb, emb)
            self.cidx[sl] = np.arange(self.count, self.count + n)
        self.end += n
        self.count += n

    def reserve(self, n: int) -> None:
        """Makes room for ``n`` more rows after ``end`` (moving the live rows to the front of new
        buffers when they do not fit)."""
        if self.end + n > self.emb.shape[0]:
            need = self.live + n
            cap = self.emb.shape[0]
            self._resize(max(_MIN_CAP, int(_GROWTH * need)) if need > cap // 2 else cap)

    def note_time(self, now: float) -> None:
        """Before rows of time ``now`` are recorded: whether the rows' times stay monotone."""
        if self.end == self.start:
            self.monotone = True  # no rows left from before a clock step back
        elif now < self.time[self.end - 1]:
            self.monotone = False

    def trim(self, min_seq: int, min_cidx: int, min_time: float) -> int:
        """Drops the oldest rows with ``seq < min_seq``, ``cidx < min_cidx`` or (a prefix of) those
        older than ``min_time``; returns how many were dropped."""
        s, e = self.start, self.end
        if s == e or (self.seq[s] >= min_seq and self.cidx[s] >= min_cidx):  # the usual case: no search
            cut = 0
        else:
            cut = max(int(self.seq[s:e].searchsorted(min_seq)), int(self.cidx[s:e].searchsorted(min_cidx)))
        if s + cut < e and self.time[s + cut] < min_time:  # else the prefix of old rows is empty
            old = self.time[s + cut:e] < min_time
            cut += int(old.argmin()) if not old.all() else e - s - cut
        self.start += cut
        cap = self.emb.shape[0]
        if cap > 4 * _MIN_CAP and self.live < cap // 4:
            self._resize(max(_MIN_CAP, 2 * self.live))
        return cut


def pairwise_sq(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """``[N, d]`` x ``[M, d]`` float32 -> ``[N, M]`` float32 squared Euclidean distances, computed as
    ``|a|^2 + |b|^2 - 2 a.b`` and clamped at 0; ``b_sq`` ``[M]``: the rows' squared norms when known.
    The product with numpy's BLAS (for a few queries a matrix-vector product, twice as fast as
    torch's matmul at this size: bench/results/stateful.stage_cpu.md)."""
    a32 = np.asarray(a, dtype=np.float32)  # [N, d]
    b32 = np.asarray(b, dtype=np.float32)  # [M, d]
    sq_b = np.einsum("md,md->m", b32, b32) if b_sq is None else b_sq
    d2 = np.einsum("nd,nd->n", a32, a32)[:, None] + sq_b[None, :]  # [N, M]
    ab = b32 @ a32.T  # [M, N]
    ab *= 2.0
    d2 -= ab.T
    return np.maximum(d2, 0.0, out=d2)


def pairwise_l2(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """:func:`pairwise_sq`'s square roots: ``[N, M]`` float32 Euclidean distances."""
    return np.sqrt(pairwise_sq(a, b, b_sq))


# The single-query scan (the usual call: a batch's items come from different clients) compiled with
# numba, when it is installed: one pass over the client's rows that checks the retry digests and keeps
# the k smallest squared distances. In numpy the same work is ~12 calls (comparison, product, sums,
# partition, sort), whose fixed cost per call was most of the store's ~45 µs per query at 3,000 rows
# (bench/results/stateful.stage_cpu.md); the compiled pass reads each row once. Without numba (the
# GPU machine's environment) the numpy path computes the same distances.
_SCAN_FLAGS = {"reassoc", "contract", "nsz", "arcp"}  # fastmath without nnan/ninf: rows pad with inf


def _scan_source(emb, sq, digest, first, near, end, q, q_digest, out):  # numba-compiled by scan_kernel()
    """Rows ``[first, end)`` of ``emb`` ``[M, d]`` (squared norms ``sq``, ``digest``) against one query
    ``q`` ``[d]``: -1 (``out`` untouched) when a row's digest equals ``q_digest`` (an exact retry);
    else ``out`` ``[k]`` = the ``k`` smallest l2 distances to rows ``[near, end)`` (``near >= first``:
    the window), ascending, ``inf``-padded, and the query's squared norm (the row it will be recorded as)."""
    for r in range(first, end):
        if digest[r] == q_digest:
            return np.float32(-1.0)
    k = out.shape[0]
    for i in range(k):
        out[i] = np.inf
    qq = np.float32(0.0)
    for j in range(q.shape[0]):
        qq += q[j] * q[j]
    for r in range(near, end):
        dot = np.float32(0.0)
        for j in range(q.shape[0]):
            dot += emb[r, j] * q[j]
        v = max(sq[r] + qq - np.float32(2.0) * dot, np.float32(0.0))
        if v < out[k - 1]:  # insertion into the k kept, ascending
            p = k - 1
            while p > 0 and out[p - 1] > v:
                out[p] = out[p - 1]
                p -= 1
            out[p] = v
    for i in range(k):
        out[i] = np.sqrt(out[i])
    return qq


@functools.cache
def scan_kernel():
    """The compiled :func:`_scan_source` (defenses/stateful/kernels.py), or None when numba is not
    installed."""
    return compile_kernel(_scan_source, "f4(f4[:, ::1], f4[::1], u8[::1], i8, i8, i8, f4[::1], u8, f4[::1])",
                          fastmath=_SCAN_FLAGS)


@functools.cache
def step_kernel():
    """:func:`scan_kernel`'s scan inside a compiled loop over one client's queries of a call (the
    function below), or None when numba is not installed. One call per client and batch replaces a
    few Python calls per query (finding the first live row, the scan, writing the row), which at one
    or two queries per client cost more than the scan itself."""
    scan = scan_kernel()
    if scan is None:
        return None

    def step(emb, sq, digest, tm, seq, cidx, state, max_entries, max_per_client, ttl, window, now, qs, q_digests, out):
        """A client's queries ``qs`` ``[n, d]`` (``q_digests`` ``[n]``) scored and recorded one after
        the other into its buffers (``_History``'s arrays, with room for ``n`` more rows, their times
        monotone): ``state`` ``[4]`` int64 = (first row to consider, end, the client's queries
        recorded, the store's sequence number) on entry and on return. Per query: the first live row
        (the live rows are a suffix: each bound and, times monotone, the TTL cut a prefix), found by
        moving forward; the scan (``out[i]``: its ``k`` distances, or ``inf`` for a retry, which is
        not recorded); the query written as row ``end``. ``window`` 0: none. Returns how many
        queries were recorded."""
        first, end, count, gseq = state[0], state[1], state[2], state[3]
        recorded = 0
        for i in range(qs.shape[0]):
            while first < end and not (seq[first] > gseq - max_entries and count - cidx[first] <= max_per_client
                                       and now - tm[first] <= ttl):
                first += 1
            near = first if window <= 0 else max(first, end - window)
            qq = scan(emb, sq, digest, first, near, end, qs[i], q_digests[i], out[i])
            if qq < 0:
                out[i, :] = np.inf  # an exact retry: no evidence, not recorded
                continue
            emb[end, :] = qs[i]
            sq[end], digest[end], tm[end] = qq, q_digests[i], now
            gseq += 1
            seq[end], cidx[end] = gseq, count
            count += 1
            end += 1
            recorded += 1
        state[0], state[1], state[2], state[3] = first, end, count, gseq
        return recorded

    return compile_kernel(step, "i8(f4[:, ::1], f4[::1], u8[::1], f8[::1], i8[::1], i8[::1], i8[::1], i8, i8, f8, i8, "
                                "f8, f4[:, ::1], u8[::1], f4[:, ::1])")


def k_smallest(d: np.ndarray, k: int) -> np.ndarray:
    """``[N, M]`` -> ``[N, k]``: each row's ``k`` smallest values ascending, ``inf``-padded."""
    n, m = d.shape
    if m > k:
        d = np.partition(d, k - 1, axis=1)[:, :k]
    elif m < k:
        d = np.concatenate([d, np.full((n, k - m), np.inf, dtype=d.dtype)], axis=1)
    return np.sort(d, axis=1)


def check_call(groups: list[tuple[str, np.ndarray, np.ndarray]], k: int, window: int | None,
               dim: int | None) -> int | None:
    """Validates an ``observe_batch`` call of a k-NN store holding ``dim``-dimensional embeddings (None:
    none yet) -> the dimensions it holds after the call (ValueError naming what is wrong)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    for _, d, e in groups:
        if d.dtype != np.uint64 or d.ndim != 1:
            raise ValueError(f"digests must be [N] uint64, got {d.dtype} {d.shape}")
        if e.ndim != 2 or e.shape[0] != d.shape[0]:
            raise ValueError(f"embeddings must be [N, d] with N = {d.shape[0]}, got {e.shape}")
        if dim is not None and e.shape[1] != dim:
            raise ValueError(f"embeddings have {e.shape[1]} dimensions, this store holds {dim}")
        dim = dim or int(e.shape[1])
    return dim


class KnnMemoryStore(ClientFlags, HistoryStore):
    """In-process store of embeddings per client (module docstring). ``key``: the 16-byte secret of
    the retry digests (random per store)."""

    backend = "memory"
    holds = "embeddings"  # what a query is remembered as (the detector checks it can use the store)

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
        self._step = step_kernel()  # the compiled path (a client's queries of a call), None without numba
        self._state = np.zeros(4, dtype=np.int64)  # its in/out state (_observe_compiled)
        self._init_flags()

    def fingerprint_key(self) -> bytes:
        return self._key

    def _queries(self, client: str) -> int:
        h = self._clients.get(client)
        return 0 if h is None else h.count

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
                now: float | None = None, window: int | None = None) -> np.ndarray:
        """One client's queries (module docstring): digests ``[N]`` uint64, embeddings ``[N, d]`` ->
        ``[N, k]`` float32 distances to the ``k`` nearest live earlier queries (``inf``: none) among
        the client's last ``window`` remembered ones before each (None: all of them). Exact retries are
        recognised over the whole history."""
        return self.observe_batch([(client, digests, embeddings)], k, now, window)[0]

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]], k: int,
                      now: float | None = None, window: int | None = None) -> list[np.ndarray]:
        """:meth:`observe` for several clients, one after the other in the order given."""
        self._dim = check_call(groups, k, window, self._dim)
        now = time.time() if now is None else float(now)
        with self._lock:
            return [self._observe(self._client(c, e.shape[1]), d, np.ascontiguousarray(e, dtype=np.float32), k, now,
                                  window) for c, d, e in groups]

    def _live(self, h: _History, seq: int, count: int, now: float) -> np.ndarray:
        """``[live rows]`` bool: rows a query sees when ``seq`` queries were recorded in all and
        ``count`` by this client (global bound, per-client bound, TTL)."""
        s, e = h.start, h.end
        return ((h.seq[s:e] > seq - self.max_entries) & (count - h.cidx[s:e] <= self.max_per_client)
                & (now - h.time[s:e] <= self.ttl_s))

    def _first_live(self, h: _History, seq: int, count: int, now: float) -> int:
        """:meth:`_live` when ``h.monotone``: the first row a query sees; it sees every later row too
        (sequence numbers, client indices and, monotone, times never decrease along the rows, so each
        bound cuts a prefix; found by binary search on the same comparisons)."""
        s, e = h.start, h.end
        if s == e or (h.seq[s] > seq - self.max_entries and count - h.cidx[s] <= self.max_per_client
                      and now - h.time[s] <= self.ttl_s):  # the usual case: the first row is live, so all are
            return s
        lo = s + max(int(h.seq[s:e].searchsorted(seq - self.max_entries + 1)),  # seq > seq - max_entries
                     int(h.cidx[s:e].searchsorted(count - self.max_per_client)))  # count - cidx <= max_per_client
        if lo < e and not now - h.time[lo] <= self.ttl_s:  # the TTL cuts further: bisect on its comparison
            a, b = lo + 1, e
            while a < b:
                mid = (a + b) // 2
                if now - h.time[mid] <= self.ttl_s:
                    b = mid
                else:
                    a = mid + 1
            lo = a
        return lo

    def _seen(self, h: _History, r: int, now: float) -> int | np.ndarray:
        """The history rows the call's ``r``-th recorded query sees: the first of them (an int; all
        later rows too) when ``h.monotone``, else a bool mask over rows ``[start, end)``."""
        if h.monotone:
            return self._first_live(h, self._seq + r, h.count + r, now)
        return self._live(h, self._seq + r, h.count + r, now)

    def _observe_compiled(self, h: _History, digests: np.ndarray, emb: np.ndarray, k: int, now: float,
                          window: int | None) -> np.ndarray:
        """:meth:`_observe` for a client whose rows' times are monotone, with numba: its queries one
        after the other in one compiled call (:func:`step_kernel`), then the bookkeeping of
        :meth:`_record` once for the call."""
        n = digests.shape[0]
        if h.end + n > h.emb.shape[0]:  # no room: new buffers
            self._bytes -= h.bytes
            h.reserve(n)
            self._bytes += h.bytes
        state = self._state  # the store's lock is held: one buffer serves every call
        state[0], state[1], state[2], state[3] = h.start, h.end, h.count, self._seq
        out = np.empty((n, k), dtype=np.float32)
        r = self._step(h.emb, h.sq, h.digest, h.time, h.seq, h.cidx, state, self.max_entries, self.max_per_client,
                       self.ttl_s, window or 0, now, emb, np.ascontiguousarray(digests), out)
        if r:
            h.note_time(now)  # the new rows' time against the last old row's (end is still the old one)
            h.end += r
            h.count += r
            self._recorded(h, r, now)
        return out

    def _observe_one(self, h: _History, digest: np.ndarray, emb: np.ndarray, k: int, now: float,
                     window: int | None) -> np.ndarray:
        """:meth:`_observe` for one query of a client whose rows' times are monotone, without numba:
        the rows it sees are ``[first, end)``, its neighbours the last ``window`` of them; no
        call-internal retries or moving bounds to consider."""
        first, e = self._first_live(h, self._seq, h.count, now), h.end
        near = first if window is None else max(first, e - window)
        if first < e and (h.digest[first:e] == digest[0]).any():  # an exact retry: no evidence, not recorded
            return np.full((1, k), np.inf, dtype=np.float32)
        if near < e:
            out = np.sqrt(k_smallest(pairwise_sq(emb, h.emb[near:e], h.sq[near:e]), k))  # [1, k]; sqrt is monotone
        else:
            out = np.full((1, k), np.inf, dtype=np.float32)
        self._record(h, emb, digest, now)
        return out

    def _observe(self, h: _History, digests: np.ndarray, emb: np.ndarray, k: int, now: float,
                 window: int | None = None) -> np.ndarray:
        n, s, e = digests.shape[0], h.start, h.end
        if h.monotone and self._step is not None:
            # with numba, one query or several of one client (a client with several requests in one batch):
            # one after the other in one compiled call -- the definition of the call (each sees the ones
            # before it), and at a few queries per client cheaper than the vectorised pass below, whose
            # numpy calls cost more than the rows they compare (bench/results/stateful.stage_cpu.md)
            return self._observe_compiled(h, digests, emb, k, now, window)
        if n == 1 and h.monotone:
            return self._observe_one(h, digests, emb, k, now, window)
        hist = h.digest
        # 1. which history rows each query sees: the same for the whole call unless a bound moves in it
        seen0 = self._seen(h, 0, now)
        if h.monotone:
            moving = n > 1 and self._seen(h, n - 1, now) != seen0
            live_d = hist[seen0:e]
        else:
            moving = n > 1 and not np.array_equal(seen0, self._seen(h, n - 1, now))
            live_d = hist[s:e][seen0]
        # 2. retries: a digest seen live in the history or recorded earlier in this call (and still
        # within the bounds: the r-th recorded query sees the call's j-th while r - j <= lim)
        lim = min(self.max_entries, self.max_per_client)
        in_hist = np.zeros(n, dtype=bool)  # [N] the digest is a live history entry's
        if live_d.size and not moving:
            # a comparison table for the usual small calls (np.isin sorts, costlier below ~10^6 pairs)
            if n == 1:
                in_hist[0] = (live_d == digests[0]).any()
            elif n * live_d.size <= 1 << 20:
                in_hist = (live_d[:, None] == digests[None, :]).any(0)
            else:
                in_hist = np.isin(digests, live_d)
        recorded = np.zeros(n, dtype=bool)
        seen: dict[int, int] = {}  # digest -> its index among the call's recorded queries
        views = []  # per recorded query: the rows it sees (a _seen value)
        r = 0
        for i, d in enumerate(digests.tolist()):
            if (d in seen and r - seen[d] <= lim) or in_hist[i]:
                continue
            view = self._seen(h, r, now) if moving else seen0
            if moving:
                rows = hist[view:e] if h.monotone else hist[s:e][view]
                if (rows == np.uint64(d)).any():
                    continue
            recorded[i] = True
            seen[d] = r
            views.append(view)
            r += 1
        if not r:
            return np.full((n, k), np.inf, dtype=np.float32)
        # 3. squared distances to the history rows seen and to the earlier recorded queries of the call
        idx = np.flatnonzero(recorded) if r < n else None
        q = emb if idx is None else emb[idx]  # [R, d]
        base = seen0 if h.monotone else s  # the first history row compared (columns from there)
        parts = []
        if base < e:
            d2 = pairwise_sq(q, h.emb[base:e], h.sq[base:e])  # [R, e - base]
            if moving:  # each query's own view
                for j, view in enumerate(views):
                    if h.monotone:
                        d2[j, :view - base] = np.inf
                    else:
                        d2[j, ~view] = np.inf
            elif not h.monotone:
                d2[:, ~seen0] = np.inf
            if window is not None:  # the j-th recorded query's neighbours: its last `window` remembered queries,
                # the call's j earlier ones and the last window - j history rows it sees
                seen_cols = np.isfinite(d2)  # [R, e - base] the rows each query sees (distances are finite)
                rank = np.cumsum(seen_cols[:, ::-1], axis=1)[:, ::-1]  # 1 = the latest row it sees
                d2[rank > (window - np.arange(r))[:, None]] = np.inf
            parts.append(d2)
        if r > 1:
            gap = np.arange(r)[:, None] - np.arange(r)[None, :]  # [R, R] r - j
            mine = pairwise_sq(q, q)  # [R, R]
            mine[~((gap > 0) & (gap <= min(lim, window or lim)))] = np.inf
            parts.append(mine)
        near = np.sqrt(k_smallest(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1), k) if parts
                       else np.full((r, k), np.inf, dtype=np.float32))  # [R, k]; sqrt is monotone
        if r == n:
            out = near
        else:
            out = np.full((n, k), np.inf, dtype=np.float32)
            out[idx] = near
        self._record(h, q, digests if idx is None else digests[idx], now)
        return out

    def _record(self, h: _History, emb: np.ndarray, digests: np.ndarray, now: float) -> None:
        """Records a client's ``[R]`` new queries (:meth:`_recorded`)."""
        r = digests.shape[0]
        first = self._seq + 1
        self._bytes -= h.bytes
        h.append(emb, digests, now, first if r == 1 else np.arange(first, first + r, dtype=np.int64))
        self._bytes += h.bytes
        self._recorded(h, r, now)

    def _recorded(self, h: _History, r: int, now: float) -> None:
        """After ``r`` queries of ``h`` were written as its last rows with the next sequence numbers:
        counts them, then drops what fell out of the bounds (this client's rows and those of the
        owners of the entries they push out of the global bound)."""
        first = self._seq + 1
        self._held += r
        self._seq += r
        owners: tuple[int, ...] | set[int] = (h.cid,)  # whose rows may fall out: h, and the owners pushed out
        if r == 1:  # the usual call: one slot of the ring, in scalars
            slot = first % self.max_entries
            if first > self.max_entries and (pushed := int(self._owner[slot])) != h.cid:  # the entry pushed out
                owners = (h.cid, pushed)
            self._owner[slot] = h.cid
        elif (at := first % self.max_entries) + r <= self.max_entries:  # one slice of the ring, no wrap
            if self._seq > self.max_entries:  # the new entries past max_entries push entries out
                owners = {h.cid, *self._owner[at + max(0, self.max_entries + 1 - first):at + r].tolist()}
            self._owner[at:at + r] = h.cid
        else:
            seqs = np.arange(first, first + r, dtype=np.int64)
            ring = seqs % self.max_entries
            if self._seq > self.max_entries:  # entries pushed out
                owners = {h.cid, *np.unique(self._owner[ring][seqs > self.max_entries]).tolist()}
            self._owner[ring] = h.cid
        for cid in owners:
            owner = self._by_id.get(cid)
            if owner is not None:
                self._bytes -= owner.bytes
                self._held -= owner.trim(self._seq - self.max_entries + 1,
                                         owner.count - self.max_per_client, now - self.ttl_s)
                self._bytes += owner.bytes
