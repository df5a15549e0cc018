"""Blacklight: probabilistic content fingerprints of each client's queries (Li et al., "Blacklight:
Scalable Defense for Neural Networks against Query-Based Black-Box Attacks", USENIX Security 2022).

A query-based attack sends thousands of queries that differ from one another in a few pixels.
Blacklight turns each query into a small set of hashes that two such queries share and two
unrelated images almost never do, and flags a query that shares many of its hashes with one
earlier query:

1. quantise: raw pixels to 8 bits, plus a secret per-pixel offset in ``[0, q)`` (the "salt" of the
   stateful-defense reproduction by Feng et al., CCS 2023, so the bucket edges are secret too),
   then ``level = value // q`` (step ``q``);
2. slide a window of ``w`` levels with stride ``s`` over the *flattened* ``C x H x W`` image (so
   any input shape works, as in the paper) and hash each window with a keyed universal hash and a
   keyed finaliser (:func:`window_hashes`; the key comes from the store, so an attacker can neither
   precompute collisions nor know which hashes a query keeps);
3. keep the ``k`` largest distinct hash values: the fingerprint, a keyed pseudorandom sample of
   the windows that two near-copies sample alike;
4. score = the number of fingerprint hashes shared with one earlier query of the same client
   (matched through the store's inverted index; defenses/stateful/store.py states the exact
   counting rule); flagged when ``score > threshold``.

Exact retries (the same bytes again, identified by a keyed digest of the raw input, :func:`digests`)
score 0: clients retry, and a retry gives an attacker no new information.

Symbols: ``q`` = ``quantization``, ``w`` = ``window``, ``s`` = ``stride``, ``k`` = ``top_k``. The
paper's values for the 32 x 32 datasets (and MNIST) are q = 50, w = 20, s = 1, top 50 hashes, a
match threshold of 25; the CCS 2023 reproduction uses w = 50, s = 25 for 3 x 224 x 224. Defaults
here: q = 50, w = 20, s = 1 and k = 20 (not 50: the store's memory bound, 1,000,000 remembered
queries in 256 MiB, leaves room for about 20 postings per query; bench/results/stateful.cost.md);
the threshold is calibrated on benign streams (defenses.stateful.calibration), not fixed.

Known limits: an adaptive attacker who spaces queries beyond the history's bounds, applies random
transformations between queries (Feng et al., CCS 2023) or spreads queries over many identities
(Sybil) evades a per-client history; benign clients that resend near-duplicates (crops,
re-encodings) raise scores, which is what the calibration on benign near-duplicate streams prices in.
"""

from __future__ import annotations

import functools
import hashlib
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from robustgate.defenses.stateful.base import StatefulDetector
from robustgate.defenses.stateful.kernels import compile_kernel
from robustgate.defenses.stateful.store import HistoryStore, MemoryStore

_U = np.uint64


class WindowKey(NamedTuple):
    """The secret material of one store's fingerprints for inputs of one size (:func:`window_key`)."""

    salt: np.ndarray  # [D] int16 in [0, q): per-pixel quantisation offsets
    coeffs: np.ndarray  # [ceil(w / 2)] uint64: the multilinear hash's coefficients
    final: np.uint64  # xored into each window's hash before the finaliser
    bits: int  # bits per level: two levels share one symbol of 2 * bits bits


def window_key(key: bytes, size: int, q: int, window: int) -> WindowKey:
    """The per-store secrets for inputs of ``size`` values, derived from the store's 16-byte
    ``key`` (so Redis-sharing replicas agree), quantisation step ``q`` and ``window``."""
    seed = int.from_bytes(hashlib.blake2b(key, person=b"rg-blacklight", digest_size=16).digest(), "little")
    rng = np.random.default_rng(seed)
    salt = rng.integers(0, q, size=size, dtype=np.int64).astype(np.int16)
    coeffs = rng.integers(0, 2**64, size=(window + 1) // 2, dtype=np.uint64)
    final = rng.integers(0, 2**64, dtype=np.uint64)
    bits = ((255 + q - 1) // q).bit_length()  # the largest level is (255 + q - 1) // q
    return WindowKey(salt, coeffs, _U(final), bits)


def quantise(x: torch.Tensor, salt: np.ndarray, q: int, value_range: tuple[float, float]) -> np.ndarray:
    """``[N, C, H, W]`` float pixels -> ``[N, C*H*W]`` uint8 levels ``(round(255 * x') + salt) // q``
    with ``x'`` scaled from ``value_range`` to ``[0, 1]`` and ``salt`` ``[C*H*W]`` in ``[0, q)``."""
    lo, hi = value_range
    v = x.reshape(x.shape[0], -1).float().numpy() - lo  # [N, D] (a new array: x is not written)
    v *= 255.0 / (hi - lo)
    np.rint(v, out=v)  # round half to even, as torch.round
    return ((v.astype(np.int16) + salt) // q).astype(np.uint8)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on ``h`` (uint64): a bijection whose every output
    bit depends on every input bit (avalanche)."""
    h ^= h >> _U(33)
    h *= _U(0xFF51AFD7ED558CCD)
    h ^= h >> _U(33)
    h *= _U(0xC4CEB9FE1A85EC53)
    h ^= h >> _U(33)
    return h


def window_hashes(levels: np.ndarray, wkey: WindowKey, window: int, stride: int) -> np.ndarray:
    """``[N, D]`` uint8 levels -> ``[N, L]`` uint64 keyed hashes of each window of ``w`` levels at
    stride ``s``, ``L = (D - w) // s + 1``, computed for all windows of all items at once.

    Why this is a sound Blacklight fingerprint (it replaces a per-window SipHash, a PRF, at a small
    fraction of the cost):

    1. pack two neighbouring levels into one symbol ``y_t = l_t | l_{t+1} << b`` (``b`` bits per
       level, so the packing is injective); a window is the ``ceil(w / 2)`` symbols
       ``y_j, y_{j+2}, ...`` (the last one a single level when ``w`` is odd);
    2. multilinear hash ``m_j = sum_i a_i * y_{j+2i} mod 2**64`` with secret uniform 64-bit ``a_i``
       (one multiply-add over the whole ``[N, L]`` batch per coefficient). Equal windows give equal
       ``m``. Two unequal windows differ in some symbol by ``d != 0`` with ``|d| < 2**(2b)``, and
       ``sum_i a_i d_i = 0 mod 2**64`` has probability ``2**(v - 64)`` over the key, ``v`` the lowest
       2-adic valuation among the ``d_i`` (< 2b): at most ``2**(2b - 65)`` (``2**-59`` at the
       default q = 50, b = 3) -- a universal hash (Carter & Wegman 1979; multilinear hashing,
       Lemire & Kaser 2016). Unlike a polynomial hash modulo ``2**64`` (whose collisions can be
       likely for structured differences such as ``(1, -2, 1)``), this bound holds for every pair;
    3. ``h_j = fmix64(m_j xor f)``, ``f`` a secret word: a bijection, so collisions stay those of
       step 2, while the order of the hashes -- which windows land in the top k -- is scrambled by
       a keyed nonlinear mix. An attacker who knows neither ``a`` nor ``f`` cannot tell which
       windows a query's fingerprint keeps, so cannot aim a perturbation outside them (Blacklight's
       requirement; the paper uses SHA-256 per window). ``fmix64`` is not a cryptographic PRF: an
       attacker who could read many hashes might learn about the key, but hashes never leave the
       store (scores do not go to anonymous clients, docs/OPERATIONS.md).

    No installed library hashes many short windows under a secret key in one vectorised call
    (hashlib is one call per message), hence these few numpy operations.
    """
    n, d = levels.shape
    w, s, b, pairs = window, stride, wkey.bits, window // 2
    length = (d - w) // s + 1
    lv = levels.astype(np.uint64)  # [N, D]
    if pairs:
        sym = lv[:, :-1] | (lv[:, 1:] << _U(b))  # [N, D - 1]: y_t = l_t | l_{t+1} << b
        st0, st1 = sym.strides  # window j's symbols y_{js}, y_{js+2}, ...: a strided view, no copy
        win = as_strided(sym, shape=(n, length, pairs), strides=(st0, st1 * s, st1 * 2), writeable=False)  # [N, L, w // 2]
        h = np.einsum("nlw,w->nl", win, wkey.coeffs[:pairs])  # [N, L] sum_i a_i y_{j+2i} mod 2**64
    else:
        h = np.zeros((n, length), dtype=np.uint64)
    if w % 2:  # an odd window's last symbol is its last level alone
        h += lv[:, w - 1:w - 1 + (length - 1) * s + 1:s] * wkey.coeffs[pairs]
    h ^= wkey.final
    return fmix64(h)


def _distinct_top(h: np.ndarray, k: int) -> np.ndarray:
    """``[N, M]`` -> ``[N, min(k, M)]``: each row's largest distinct values, ascending, 0-padded on the left."""
    h = np.sort(h, axis=1)
    h[:, 1:][h[:, 1:] == h[:, :-1]] = 0  # keep one of each run of equal values
    if h.shape[1] > k:
        h = np.partition(h, h.shape[1] - k, axis=1)[:, -k:]  # the k largest, unordered
    return np.sort(h, axis=1)


def top_k_distinct(h: np.ndarray, k: int) -> np.ndarray:
    """``[N, L]`` uint64 -> ``[N, k]``: each row's ``k`` largest distinct values, ascending; rows with
    fewer distinct values are padded with 0 (= no hash; a hash value of 0 has probability 2**-64).

    Every value above the smallest of a row's ``2k`` largest (with repeats) is among them, so when
    those hold ``k`` distinct values they hold the answer: a partial selection (``np.partition``)
    instead of sorting all ``L`` windows; the rows where repeats crowd them out take the full sort."""
    n, length = h.shape
    if length > 2 * k:
        out = _distinct_top(np.partition(h, length - 2 * k, axis=1)[:, -2 * k:], k)  # [N, k]
        short = np.flatnonzero(out[:, 0] == 0)  # fewer than k distinct among the 2k largest
        if short.size:
            out[short] = _distinct_top(h[short], k)
        return out
    out = _distinct_top(h, k)
    if out.shape[1] < k:
        out = np.concatenate([np.zeros((n, k - out.shape[1]), dtype=np.uint64), out], axis=1)
    return out


@functools.lru_cache(maxsize=4)  # a pure function of its arguments; a store hashes one input size
def digest_key(key: bytes, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The secret coefficients of :func:`digests` for items of ``size`` 32-bit words under the
    store's 16-byte ``key``: ``m_0`` ``[2]`` and ``m_1..m_size`` ``[size, 2]`` (C order: the matrix
    product reads them row by row) uint64, one column per half, from SHAKE-256 (an extendable-output
    function) of the key and the size, so each input size has its own independent key and
    Redis-sharing replicas agree."""
    seed = b"rg-retry-digest" + bytes(key) + int(size).to_bytes(8, "little")
    m = np.frombuffer(hashlib.shake_256(seed).digest(16 * (size + 1)), dtype="<u8").astype(np.uint64).reshape(2, -1)
    return m[:, 0].copy(), np.ascontiguousarray(m[:, 1:].T)  # shared by the cache's callers: read, never written


def digests(x: torch.Tensor | np.ndarray, key: bytes) -> np.ndarray:
    """``[N, ...]`` (tensor or array) -> ``[N]`` uint64: a keyed digest of each item's raw float32
    bytes (retries).

    Each item's ``D`` float32 values are read as 32-bit words ``s_1..s_D``; the digest is two
    32-bit halves ``(m_0 + sum_i m_i s_i mod 2**64) >> 32``, each under its own secret uniform
    64-bit coefficients ``m`` (:func:`digest_key`). This family is strongly universal for inputs of
    one length (Lemire & Kaser, "Strongly universal string hashing is fast", 2014, the Multilinear
    family): for any two distinct items, a half collides with probability ``2**-32`` over the key,
    so the digest with ``2**-64`` -- whatever the items, so an attacker who does not know the key
    cannot make a new query pass as a retry of an earlier one more often than that. Digests never
    leave the store (nor does anything computed from them), so no answer reveals the key.

    Computed in one compiled loop per batch (:func:`digest_kernel`), which keeps the GIL for items
    under :data:`RELEASE_GIL_WORDS`; numpy's integer product without numba. Why not hashlib's keyed
    BLAKE2b (used before 2026-12-06, the same guarantee and more): it is one call per item, fed in
    chunks that keep the GIL (hashlib releases it for 2,048 bytes or more), and cost several times
    more per 28x28 item (``digests`` in bench/results/stateful.stage_cpu.md)."""
    if isinstance(x, np.ndarray):  # the fused path's batch: no torch call (each releases the GIL)
        raw = np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape[0], -1)
    elif x.dtype == torch.float32 and x.is_contiguous():
        raw = x.numpy().reshape(x.shape[0], -1)
    else:
        raw = x.reshape(x.shape[0], -1).float().contiguous().numpy()
    words = raw.view(np.uint32)  # [N, D]
    m0, m1 = digest_key(key, words.shape[1])  # [2], [D, 2]
    kernel = digest_kernel(release_gil=words.shape[1] >= RELEASE_GIL_WORDS)
    if kernel is not None:
        out = np.empty(words.shape[0], dtype=np.uint64)
        kernel(words, m0, m1, out)
        return out
    s = words @ m1  # [N, 2] mod 2**64 (uint64 arithmetic wraps; the words widened inside the product)
    s += m0
    return (s[:, 0] >> _U(32)) | (s[:, 1] & _U(0xFFFFFFFF00000000))


def _digest_source(words, m0, m1, out):  # numba-compiled by digest_kernel()
    """:func:`digests`' arithmetic: ``words`` ``[N, D]`` uint32, ``m0`` ``[2]``, ``m1`` ``[D, 2]``
    -> ``out`` ``[N]``."""
    top = np.uint64(0xFFFFFFFF00000000)
    shift = np.uint64(32)
    for n in range(words.shape[0]):
        a, b = m0[0], m0[1]
        for i in range(words.shape[1]):
            w = np.uint64(words[n, i])
            a += m1[i, 0] * w
            b += m1[i, 1] * w
        out[n] = (a >> shift) | (b & top)


# Items of this many 32-bit words or more (256 KiB; 3x224x224 is 150,528 words, ~115 us per item here) are
# hashed by a kernel that releases the GIL: waiting to take it back from the event loop then costs less than
# holding it, which would stall the loop for the whole batch. Smaller items (28x28: 784 words, ~1 us) keep it.
RELEASE_GIL_WORDS = 1 << 16


@functools.cache
def digest_kernel(release_gil: bool = False):
    """The compiled :func:`_digest_source` (defenses/stateful/kernels.py; ``release_gil``: a ``nogil``
    variant, for large items), or None without numba: numpy's integer product then computes the same
    digests, but may release the GIL."""
    return compile_kernel(_digest_source, "void(u4[:, ::1], u8[::1], u8[:, ::1], u8[::1])", nogil=release_gil)


class Blacklight(StatefulDetector):
    """Blacklight's fingerprint matching (module docstring). ``observe(client, x [N, C, H, W])`` ->
    ``[N]`` float32 match counts in ``[0, top_k]``; 0 for an exact retry."""

    kind: ClassVar[str] = "blacklight"

    def __init__(self, quantization: int = 50, window: int = 20, stride: int = 1, top_k: int = 20,
                 threshold: float | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                 store: HistoryStore | None = None):
        for name, value, hi in (("quantization", quantization, 255), ("window", window, None),
                                ("stride", stride, None), ("top_k", top_k, None)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (hi is not None and value > hi):
                raise ValueError(f"{name} must be an integer in [1, {hi or 'inf'}], got {value!r}")
        self.quantization, self.window, self.stride, self.top_k = quantization, window, stride, top_k
        super().__init__(threshold=threshold, value_range=value_range, store=store)
        digest_kernel(), digest_kernel(release_gil=True)  # compiled (or loaded from numba's cache) now
        self._keys: dict[tuple[bytes, int], WindowKey] = {}

    def default_store(self) -> HistoryStore:
        return MemoryStore(hashes_per_query=self.top_k)

    def private_store(self, **bounds) -> HistoryStore:
        return MemoryStore(hashes_per_query=self.top_k, **bounds)

    def fingerprint(self, x: torch.Tensor) -> np.ndarray:
        """``[N, C, H, W]`` -> ``[N, top_k]`` uint64 hashes (steps 1-3 of the module docstring)."""
        size = x[0].numel()
        if size < self.window:
            raise ValueError(f"{self.kind}: window {self.window} is longer than the input's {size} values")
        key = self.store.fingerprint_key()
        wkey = self._keys.get((key, size))
        if wkey is None:
            wkey = self._keys[(key, size)] = window_key(key, size, self.quantization, self.window)
        levels = quantise(x, wkey.salt, self.quantization, self.value_range)  # [N, D]
        return top_k_distinct(window_hashes(levels, wkey, self.window, self.stride), self.top_k)  # [N, k]

    def _encode(self, x: torch.Tensor) -> tuple[np.ndarray, ...]:
        return digests(x, self.store.fingerprint_key()), self.fingerprint(x)

    def _observe_groups(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None) -> list[torch.Tensor]:
        scores = self.store.observe_batch([(client, d, h) for client, (d, h) in groups], now)  # one store call
        return [torch.from_numpy(s.astype(np.float32)) for s in scores]

    def _observe_live_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]],
                           now: float) -> tuple[list[float | None], np.ndarray]:
        ends, counts = self.store.observe_unblocked([(client, d, h) for client, (d, h) in groups], now)
        live = [c for c in counts if c is not None]
        return ends, np.concatenate(live).astype(np.float32) if live else np.zeros(0, dtype=np.float32)
