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
   any input shape works, as in the paper) and hash each window with SipHash-2-4 under a secret
   128-bit key (defenses/stateful/siphash.py; keyed, so an attacker can neither precompute
   collisions nor know which hashes a query keeps);
3. keep the ``k`` largest distinct hash values: the fingerprint, a keyed pseudorandom sample of
   the windows that two near-copies sample alike;
4. score = the number of fingerprint hashes shared with one earlier query of the same client
   (matched through the store's inverted index; defenses/stateful/store.py states the exact
   counting rule); flagged when ``score > threshold``.

Exact retries (the same bytes again, identified by a keyed BLAKE2b digest of the raw input) score
0: clients retry, and a retry gives an attacker no new information.

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

import hashlib
from typing import ClassVar

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from robustgate.defenses.stateful.base import StatefulDetector
from robustgate.defenses.stateful.siphash import siphash24
from robustgate.defenses.stateful.store import HistoryStore, MemoryStore


def quantise(x: torch.Tensor, salt: np.ndarray, q: int, value_range: tuple[float, float]) -> np.ndarray:
    """``[N, C, H, W]`` float pixels -> ``[N, C*H*W]`` uint8 levels ``(round(255 * x') + salt) // q``
    with ``x'`` scaled from ``value_range`` to ``[0, 1]`` and ``salt`` ``[C*H*W]`` in ``[0, q)``."""
    lo, hi = value_range
    v = torch.round((x.reshape(x.shape[0], -1).float() - lo) * (255.0 / (hi - lo))).to(torch.int16).numpy()  # [N, D]
    return ((v + salt.astype(np.int16)) // q).astype(np.uint8)


def window_hashes(levels: np.ndarray, key: bytes, window: int, stride: int) -> np.ndarray:
    """``[N, D]`` levels -> ``[N, L]`` uint64 SipHash-2-4 of each window, ``L = (D - w) // s + 1``."""
    windows = sliding_window_view(levels, window, axis=1)[:, ::stride, :]  # [N, L, w]
    n, length, _ = windows.shape
    return siphash24(key, np.ascontiguousarray(windows).reshape(n * length, window)).reshape(n, length)


def top_k_distinct(h: np.ndarray, k: int) -> np.ndarray:
    """``[N, L]`` uint64 -> ``[N, k]``: each row's ``k`` largest distinct values, ascending; rows with
    fewer distinct values are padded with 0 (= no hash; a SipHash value of 0 has probability 2**-64)."""
    h = np.sort(h, axis=1)
    h[:, 1:][h[:, 1:] == h[:, :-1]] = 0  # keep one of each run of equal values
    h = np.sort(h, axis=1)[:, -k:]
    if h.shape[1] < k:
        h = np.concatenate([np.zeros((h.shape[0], k - h.shape[1]), dtype=np.uint64), h], axis=1)
    return h


def digests(x: torch.Tensor, key: bytes) -> np.ndarray:
    """``[N, ...]`` -> ``[N]`` uint64: keyed BLAKE2b-64 of each item's raw float32 bytes (retries)."""
    raw = x.reshape(x.shape[0], -1).float().contiguous().numpy()
    out = np.empty(raw.shape[0], dtype=np.uint64)
    for i in range(raw.shape[0]):  # one C call per item; hashlib has no batch interface
        out[i] = int.from_bytes(hashlib.blake2b(raw[i].tobytes(), key=key, digest_size=8).digest(), "little")
    return out


def salt_for(key: bytes, size: int, q: int) -> np.ndarray:
    """The secret per-pixel offsets ``[size]`` in ``[0, q)``, derived from the key (replicas agree)."""
    seed = int.from_bytes(hashlib.blake2b(key, person=b"rg-blacklight", digest_size=16).digest(), "little")
    return np.random.default_rng(seed).integers(0, q, size=size, dtype=np.int64).astype(np.uint8)


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
        self._salts: dict[int, np.ndarray] = {}

    def default_store(self) -> HistoryStore:
        return MemoryStore(hashes_per_query=self.top_k)

    def fingerprint(self, x: torch.Tensor) -> np.ndarray:
        """``[N, C, H, W]`` -> ``[N, top_k]`` uint64 hashes (steps 1-3 of the module docstring)."""
        size = x[0].numel()
        if size < self.window:
            raise ValueError(f"{self.kind}: window {self.window} is longer than the input's {size} values")
        key = self.store.fingerprint_key()
        if size not in self._salts:
            self._salts[size] = salt_for(key, size, self.quantization)
        levels = quantise(x, self._salts[size], self.quantization, self.value_range)  # [N, D]
        return top_k_distinct(window_hashes(levels, key, self.window, self.stride), self.top_k)  # [N, k]

    def _observe(self, client: str, x: torch.Tensor, now: float | None) -> torch.Tensor:
        if not x.shape[0]:
            return torch.zeros(0)
        scores = self.store.observe(client, digests(x, self.store.fingerprint_key()), self.fingerprint(x), now)
        return torch.from_numpy(scores.astype(np.float32))
