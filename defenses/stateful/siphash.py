"""SipHash-2-4 (Aumasson & Bernstein, INDOCRYPT 2012), vectorised over many equal-length messages.

Blacklight hashes hundreds of pixel windows per query; calling ``hashlib`` once per window costs a
Python call each, and no installed library offers a keyed cryptographic hash over a batch of short
messages, hence this numpy version. SipHash is a keyed pseudorandom function built for exactly
this use (short inputs, secret 128-bit key, an attacker who picks the inputs): without the key an
attacker cannot predict which windows collide or which hashes a query keeps. Checked against the
paper's test vectors (tests/defenses/test_stateful_fingerprint.py).

``siphash24(key, messages)``: ``key`` 16 bytes; ``messages`` ``[M, L]`` uint8 -> ``[M]`` uint64.
"""

from __future__ import annotations

import numpy as np

_U = np.uint64
CHUNK = 4096  # messages hashed at once: the state's four arrays and a temporary stay in the L2 cache


def _rotl(x: np.ndarray, b: int, tmp: np.ndarray) -> None:
    """``x = rotl(x, b)`` in place (``tmp``: scratch of x's shape)."""
    np.right_shift(x, _U(64 - b), out=tmp)
    np.left_shift(x, _U(b), out=x)
    np.bitwise_or(x, tmp, out=x)


def _sipround(v0, v1, v2, v3, tmp) -> None:
    """One SipRound on the state arrays, in place (numpy temporaries would dominate the cost)."""
    v0 += v1; _rotl(v1, 13, tmp); v1 ^= v0; _rotl(v0, 32, tmp)  # noqa: E702
    v2 += v3; _rotl(v3, 16, tmp); v3 ^= v2  # noqa: E702
    v0 += v3; _rotl(v3, 21, tmp); v3 ^= v0  # noqa: E702
    v2 += v1; _rotl(v1, 17, tmp); v1 ^= v2; _rotl(v2, 32, tmp)  # noqa: E702


def siphash24(key: bytes, messages: np.ndarray) -> np.ndarray:
    """SipHash-2-4 of each row of ``messages`` ``[M, L]`` uint8 under ``key`` (16 bytes) -> ``[M]`` uint64."""
    if len(key) != 16:
        raise ValueError(f"siphash24: key must be 16 bytes, got {len(key)}")
    if messages.ndim != 2 or messages.dtype != np.uint8:
        raise ValueError(f"siphash24: messages must be [M, L] uint8, got {messages.dtype} {messages.shape}")
    m, length = messages.shape
    # 1. pad each message to a multiple of 8 bytes, the last byte holding length mod 256
    blocks = length // 8 + 1
    padded = np.zeros((m, blocks * 8), dtype=np.uint8)
    padded[:, :length] = messages
    padded[:, -1] = length & 0xFF
    words = padded.view("<u8").astype(np.uint64, copy=False)  # [M, blocks] little-endian words
    k0, k1 = (int.from_bytes(key[i:i + 8], "little") for i in (0, 8))
    out = np.empty(m, dtype=np.uint64)
    for a in range(0, m, CHUNK):
        b = min(m, a + CHUNK)
        # 2. initialise the state from the key (k0, k1 little-endian)
        v0 = np.full(b - a, k0 ^ 0x736F6D6570736575, dtype=np.uint64)
        v1 = np.full(b - a, k1 ^ 0x646F72616E646F6D, dtype=np.uint64)
        v2 = np.full(b - a, k0 ^ 0x6C7967656E657261, dtype=np.uint64)
        v3 = np.full(b - a, k1 ^ 0x7465646279746573, dtype=np.uint64)
        tmp = np.empty(b - a, dtype=np.uint64)
        # 3. compression: two SipRounds per 8-byte word
        for j in range(blocks):
            w = np.ascontiguousarray(words[a:b, j])
            v3 ^= w
            _sipround(v0, v1, v2, v3, tmp)
            _sipround(v0, v1, v2, v3, tmp)
            v0 ^= w
        # 4. finalisation: four SipRounds
        v2 ^= _U(0xFF)
        for _ in range(4):
            _sipround(v0, v1, v2, v3, tmp)
        out[a:b] = v0 ^ v1 ^ v2 ^ v3
    return out
