"""Output policies: what the proxy tells a client about each accepted item (issue 22, "hardened answers").

Pure functions of the classifier's logits ``[N, K]`` (float, numpy); the server integration that
picks one per model comes later. Each trades information a score-based black-box attacker needs
(Square, NES, SimBA read the margin between the top logits query after query) against what honest
clients that consume scores lose:

- :func:`full_logits` -- today's default, everything;
- :func:`top_k_probabilities` -- the k largest softmax probabilities rounded to ``decimals``;
- :func:`label_only` -- the argmax, nothing else (forces a decision-based attack);
- :func:`aaa` -- Adversarial Attack on Attackers (Chen, Huang, Tao, Wu, Xie, Huang, NeurIPS 2022):
  logits whose argmax and top-1 confidence are kept but whose margin, inside each small interval
  of width ``tau``, moves *against* the true margin, so that a random-search attacker that keeps
  the candidates lowering the margin keeps the wrong ones.

Known limits: AAA misleads attacks that follow the *reported* margin; a decision-based attack
(HopSkipJump, which reads only labels) is untouched by it, and an attacker who knows the
periodic rule can undo it by smoothing over several queries (Chen et al., Sec. 6). Rounding and
top-k slow score-based attacks down without stopping them; only label-only removes the scores.
"""

from __future__ import annotations

import numpy as np


def _check_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with K >= 2, got shape {z.shape}")
    return z


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``[N, K]`` logits -> ``[N, K]`` probabilities of ``softmax(logits / temperature)``."""
    z = _check_logits(logits) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def full_logits(logits: np.ndarray) -> np.ndarray:
    """``[N, K]`` -> the same logits (float32). Costs clients nothing; gives a score-based attacker
    the exact margin of every query."""
    return _check_logits(logits).astype(np.float32)


def top_k_probabilities(logits: np.ndarray, k: int = 1, decimals: int = 2) -> np.ndarray:
    """``[N, K]`` -> ``[N, K]`` probabilities: the ``k`` largest softmax probabilities rounded to
    ``decimals`` decimals, every other entry 0.

    Cost to clients: no logits (no temperature scaling or logit-based OOD scores of their own),
    no ranking past the k-th class, and probabilities known only to ``10**-decimals`` (two items
    differing by less look the same; a client thresholding at 0.999 with ``decimals=2`` cannot).
    Against an attacker: Square's improvements smaller than the rounding step become invisible,
    which slows it down near a confident point but does not stop it."""
    if k < 1 or decimals < 0:
        raise ValueError(f"top_k_probabilities: need k >= 1 and decimals >= 0, got k={k}, decimals={decimals}")
    p = softmax(logits)
    k = min(k, p.shape[1])
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]  # [N, k]
    out = np.zeros_like(p)
    rows = np.arange(len(p))[:, None]
    out[rows, top] = np.round(p[rows, top], decimals)
    return out.astype(np.float32)


def label_only(logits: np.ndarray) -> np.ndarray:
    """``[N, K]`` -> ``[N]`` int64 predicted class. Cost to clients: no confidence at all (no
    abstaining on low confidence, no calibrated probabilities, no ranking of the alternatives)."""
    return _check_logits(logits).argmax(axis=1).astype(np.int64)


def logit_margin(logits: np.ndarray) -> np.ndarray:
    """``[N, K]`` -> ``[N]`` margin of the predicted class: ``z_top - max_{j != top} z_j`` (>= 0)."""
    z = np.sort(_check_logits(logits), axis=1)
    return z[:, -1] - z[:, -2]


def aaa_target_margin(margin: np.ndarray, tau: float, alpha: float) -> np.ndarray:
    """The AAA-linear target margin ``[N]`` (paper, Eq. for ``l_trg``): inside each interval
    ``[k tau, (k+1) tau)`` the margin is reflected about the interval's centre (the *attractor*
    ``l_atr = (k + 1/2) tau``) and scaled by ``alpha``: ``l_trg = l_atr - alpha (l_org - l_atr)``.

    With ``0 < alpha < 1`` the target stays strictly inside its interval, so it stays > 0 (the
    argmax is kept) and within ``alpha * tau / 2`` of the attractor -- close to the true margin on
    the scale of ``tau``, but decreasing where the true one increases."""
    attractor = (np.floor(margin / tau) + 0.5) * tau  # [N]
    return attractor - alpha * (margin - attractor)


def aaa(logits: np.ndarray, tau: float = 0.5, alpha: float = 0.9, temperature: float = 1.0,
        bisection_steps: int = 60) -> np.ndarray:
    """``[N, K]`` logits -> ``[N, K]`` post-processed logits with the same argmax, the top-1
    probability of ``softmax(logits / temperature)`` (``temperature`` is the calibration
    temperature fitted on validation data; 1 keeps the model's own confidence) wherever it is
    reachable, and the AAA target margin (:func:`aaa_target_margin`).

    Written here as a closed form rather than the paper's reference loop (Adam on the logits
    against an L1 loss for a fixed number of steps): the output logits are
    ``u_top = c + m`` and ``u_j = c + lam * (z_j - z_2nd)`` for ``j != top`` (``z_2nd`` the
    runner-up), so the margin is exactly ``m`` for every ``lam >= 0`` and the top-1 probability
    ``e^m / (e^m + sum_j e^{lam (z_j - z_2nd)})`` is monotone in ``lam``, found by bisection.
    Where the target confidence is out of reach for that margin (the runner-ups cannot be made
    flatter than uniform or sharper than one class) ``lam`` stops at the nearest end; the margin
    and the argmax are always kept. ``c`` is the original top logit.

    Cost to clients: the logits' *margins* are no longer the model's (within ``alpha * tau / 2``
    of the interval centre); the argmax and (within reach) the top-1 probability are. A client
    that ranks items by margin gets an ordering that is wrong inside each ``tau`` interval; one
    that needs the full probability vector gets runner-up probabilities whose shape (order kept)
    but not values are the model's."""
    if not tau > 0 or not 0 < alpha < 1 or not temperature > 0:
        raise ValueError(f"aaa: need tau > 0, 0 < alpha < 1, temperature > 0; got tau={tau}, alpha={alpha}, "
                         f"temperature={temperature}")
    z = _check_logits(logits)
    n, k = z.shape
    rows = np.arange(n)
    top = z.argmax(axis=1)  # [N]
    zs = np.sort(z, axis=1)
    second = zs[:, -2]  # [N] runner-up logit
    m = aaa_target_margin(zs[:, -1] - second, tau, alpha)  # [N] > 0
    p_target = softmax(z, temperature)[rows, top]  # [N] calibrated top-1 probability
    others = z - second[:, None]  # [N, K] <= 0 off the top class
    others[rows, top] = 0.0
    runner_up = np.ones_like(z, dtype=bool)
    runner_up[rows, top] = False  # [N, K] the classes of the runner-up sum
    # the runner-up mass S = e^m (1 - p) / p that gives top-1 probability p with margin m
    s_target = np.exp(m) * (1.0 - p_target) / np.maximum(p_target, 1e-300)  # [N]

    def mass(lam: np.ndarray) -> np.ndarray:  # [N] -> [N], decreasing in lam
        return (np.exp(lam[:, None] * others) * runner_up).sum(axis=1)

    lo, hi = np.zeros(n), np.full(n, 1.0)
    while True:  # grow hi until the mass at hi is at or below the target (or hi is huge)
        need = (mass(hi) > s_target) & (hi < 1e6)
        if not need.any():
            break
        hi[need] *= 4.0
    for _ in range(bisection_steps):
        mid = 0.5 * (lo + hi)
        too_much = mass(mid) > s_target  # mass too large -> top-1 probability too small -> sharpen
        lo = np.where(too_much, mid, lo)
        hi = np.where(too_much, hi, mid)
    lam = 0.5 * (lo + hi)  # [N]; 0 when even uniform runner-ups give too little mass
    c = zs[:, -1]
    out = c[:, None] + lam[:, None] * others  # [N, K]
    out[rows, top] = c + m
    return out.astype(np.float32)


POLICIES = ("logits", "top_k", "label", "aaa")
