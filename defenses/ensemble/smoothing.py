"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019, "Certified Adversarial Robustness
via Randomized Smoothing"): PREDICT with abstention and CERTIFY with a certified L2 radius.

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``,
where ``f`` is the base classifier (ideally trained on the same noise: the trainer's
``--noise-sigma``). Symbols follow the paper:

    sigma       noise standard deviation (pixel units)
    n0          samples used to *select* the top class c_A (CERTIFY only)
    n           samples used to *estimate* p_A (CERTIFY) or to vote (PREDICT)
    alpha       failure probability
    n_A, n_B    counts of the top two classes
    p_A_lower   one-sided (1 - alpha) Clopper-Pearson lower confidence bound on p_A
    R           certified radius = sigma * Phi^-1(p_A_lower)

Guarantees (Cohen et al., Theorems 1-2 and Propositions 1-2):

- CERTIFY: with probability at least ``1 - alpha`` over the noise draws, if it returns class
  ``c_A`` with radius ``R`` then ``g(x + e) = c_A`` for every ``||e||_2 < R``. It abstains when
  ``p_A_lower < 1/2``.
- PREDICT: with probability at least ``1 - alpha`` over the noise draws, it either abstains or
  returns ``g(x)`` (the two-sided binomial test of ``n_A`` vs ``n_B`` rejects equality).

The guarantee is about ``g``, not about ``f``, and it holds for any base classifier -- including
``f`` composed with clamping, so clamping the noisy copies to the pixel range (``clamp=True``)
keeps it valid. Known limits: radii are small (``R <= sigma * Phi^-1(alpha^(1/n))``, about
``1.6 sigma`` at ``n = 128, alpha = 0.001``), clean accuracy falls as ``sigma`` grows, and online
certification with a small ``n`` is much looser than offline certification with ``n = 100,000``.
Each item costs ``n0 + n`` classifier calls.

Online (in the pipeline) ``expand`` draws the ``n0 + n`` (CERTIFY) or ``n`` (PREDICT) noisy copies
per item, item-major, so the pipeline's single backend call carries them, and ``aggregate``
counts the votes. Offline, :func:`certify` and :func:`predict` run the same procedure over a
torch classifier in chunks (the red team's certified accuracy at L2 radii 0.25, 0.5, 1.0).

Any ``C x H x W``: the noise is i.i.d. over every pixel and channel, and the certified radius is
an L2 distance over all ``C*H*W`` values -- the same radius allows a smaller change per value on a
larger image, so compare radii across input sizes with that in mind.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Literal

import numpy as np
import torch

from robustgate.defenses.base import Ensemble, EnsembleResult, check_images, register

ABSTAIN = -1
Mode = Literal["certify", "predict"]
# scipy.stats is imported by the functions that use it: importing it costs ~0.6 s, which every
# serving process paid at start-up (importing defenses.ensemble registers this kind) whether or
# not its pipeline smooths; after the first call the import is a dictionary lookup


# ---- pure functions: statistics on vote counts ---------------------------------------------------

def clopper_pearson_lower(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion from ``k``
    successes in ``n`` trials: the ``alpha`` quantile of ``Beta(k, n - k + 1)`` (0 when ``k = 0``)."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = beta.ppf(alpha, k, n - k + 1)
    return np.where(k > 0, lower, 0.0)


def binomial_test_pvalue(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Two-sided exact binomial test of ``P(A) = 1/2`` given ``n_A >= n_B`` counts (what
    ``scipy.stats.binomtest(n_A, n_A + n_B, 0.5).pvalue`` gives, vectorized)."""
    from scipy.stats import binom

    n_a, n_b = np.asarray(n_a, dtype=np.int64), np.asarray(n_b, dtype=np.int64)
    return np.minimum(1.0, 2.0 * binom.cdf(n_b, n_a + n_b, 0.5))


def certify_from_counts(counts0: torch.Tensor, counts: torch.Tensor, alpha: float, sigma: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """CERTIFY's decision from vote counts.

    Args:
        counts0: ``[N, K]`` votes of the ``n0`` selection samples (picks ``c_A``).
        counts: ``[N, K]`` votes of the ``n`` estimation samples (bounds ``p_A``).
    Returns:
        ``prediction`` ``[N]`` int64 (``ABSTAIN`` = -1 where ``p_A_lower < 1/2``) and ``radius``
        ``[N]`` float32 (``sigma * Phi^-1(p_A_lower)``; NaN where abstaining).
    """
    from scipy.stats import norm

    n = int(counts[0].sum()) if len(counts) else 0
    c_a = counts0.argmax(1)  # [N]
    n_a = counts.gather(1, c_a[:, None])[:, 0].cpu().numpy()  # [N]
    p_a_lower = clopper_pearson_lower(n_a, n, alpha)  # [N]
    certified = p_a_lower >= 0.5
    radius = np.where(certified, sigma * norm.ppf(np.clip(p_a_lower, 0.5, 1.0)), np.nan)
    prediction = torch.where(torch.from_numpy(certified), c_a.cpu(), torch.full_like(c_a.cpu(), ABSTAIN))
    return prediction, torch.from_numpy(radius.astype(np.float32))


def predict_from_counts(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """PREDICT's decision from ``counts`` ``[N, K]`` (K >= 2): the top class where the binomial
    test of its count against the runner-up's rejects equality at level ``alpha``, else ``ABSTAIN``.
    Returns ``[N]`` int64."""
    top2 = counts.topk(2, dim=1)  # values/indices [N, 2]
    n_a, n_b = top2.values[:, 0].cpu().numpy(), top2.values[:, 1].cpu().numpy()
    accept = torch.from_numpy(binomial_test_pvalue(n_a, n_b) <= alpha)
    c_a = top2.indices[:, 0].cpu()
    return torch.where(accept, c_a, torch.full_like(c_a, ABSTAIN))


def vote_counts(logits: torch.Tensor, copies: int) -> torch.Tensor:
    """``[N*T, K]`` item-major logits -> ``[N, K]`` int64 counts of each copy's argmax."""
    if logits.dim() != 2 or logits.shape[0] % copies:
        raise ValueError(f"smoothing: expected [N*{copies}, K] logits, got shape {tuple(logits.shape)}")
    k = logits.shape[1]
    votes = logits.argmax(1).view(-1, copies)  # [N, T]
    return torch.nn.functional.one_hot(votes, k).sum(1)  # [N, K]


def noisy_copies(x: torch.Tensor, copies: int, sigma: float, generator: torch.Generator | None = None,
                 clamp: bool = False) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N*copies, C, H, W]`` item-major, ``x_i + N(0, sigma^2 I)``."""
    rep = x.repeat_interleave(copies, dim=0)  # [N*T, C, H, W]
    eps = torch.randn(rep.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = rep + sigma * eps
    return out.clamp(0.0, 1.0) if clamp else out


# ---- offline procedures over a classifier ---------------------------------------------------------

@torch.no_grad()
def sample_counts(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num: int, sigma: float,
                  batch_size: int = 1000, generator: torch.Generator | None = None, clamp: bool = False
                  ) -> torch.Tensor:
    """Votes of ``classify`` (``[M, C, H, W]`` -> ``[M, K]`` logits) on ``num`` noisy copies of each
    item of ``x`` ``[N, C, H, W]``, in chunks of at most ``batch_size`` copies. Returns ``[N, K]``."""
    rows = []
    for xi in x:
        counts, remaining = None, num
        while remaining > 0:
            m = min(batch_size, remaining)
            logits = classify(noisy_copies(xi[None], m, sigma, generator, clamp))  # [m, K]
            c = vote_counts(logits, m)[0]  # [K]
            counts = c if counts is None else counts + c
            remaining -= m
        rows.append(counts)
    return torch.stack(rows)


def certify(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n0: int, n: int, alpha: float,
            sigma: float, batch_size: int = 1000, generator: torch.Generator | None = None, clamp: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cohen et al.'s CERTIFY for each item of ``x`` ``[N, C, H, W]``: ``(prediction [N] with
    ABSTAIN = -1, radius [N] with NaN where abstaining)``. With probability at least ``1 - alpha``
    per item, a returned class is ``g``'s prediction everywhere within the returned L2 radius."""
    counts0 = sample_counts(classify, x, n0, sigma, batch_size, generator, clamp)
    counts = sample_counts(classify, x, n, sigma, batch_size, generator, clamp)
    return certify_from_counts(counts0, counts, alpha, sigma)


def predict(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int, alpha: float, sigma: float,
            batch_size: int = 1000, generator: torch.Generator | None = None, clamp: bool = False) -> torch.Tensor:
    """Cohen et al.'s PREDICT for each item: ``[N]`` class or ABSTAIN. With probability at least
    ``1 - alpha`` per item, a returned class equals ``g(x)``."""
    return predict_from_counts(sample_counts(classify, x, n, sigma, batch_size, generator, clamp), alpha)


def certified_accuracy(prediction: torch.Tensor, radius: torch.Tensor, labels: torch.Tensor,
                       radii: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)) -> dict[float, float]:
    """Fraction of items certified correct at each L2 radius: ``prediction == label`` and
    ``radius >= r`` (an abstention is never correct)."""
    correct = (prediction == labels) & (prediction != ABSTAIN)
    r = torch.nan_to_num(radius, nan=-1.0)
    return {float(rr): float((correct & (r >= rr)).float().mean()) for rr in radii}


# ---- the online ensemble --------------------------------------------------------------------------

def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"smoothing: {name} must be an integer >= 1, got {v!r}")
    return v


@register
class RandomizedSmoothing(Ensemble):
    """Randomized smoothing in the pipeline (see the module docstring for the guarantee).

    Args:
        sigma: noise standard deviation in pixel units (> 0); must match the backbone's training noise.
        n0: selection samples (CERTIFY only).
        n: estimation samples (CERTIFY) or voting samples (PREDICT).
        alpha: failure probability in (0, 1).
        mode: ``certify`` (answer + certified L2 radius, abstain if ``p_A_lower < 1/2``) or
            ``predict`` (answer or abstain, no radius).
        clamp: clamp noisy copies to ``[0, 1]`` (for backends that validate the pixel range; the
            guarantee still holds, for the clamped base classifier).

    ``probs`` is the vote frequency over the estimation samples; its argmax is the certified
    class whenever the item is not abstained.
    """

    kind: ClassVar[str] = "smoothing"
    randomized: ClassVar[bool] = True
    differentiable: ClassVar[bool] = False  # votes are piecewise constant; attack the soft surrogate

    def __init__(self, sigma: float = 0.25, n0: int = 16, n: int = 128, alpha: float = 0.001,
                 mode: Mode = "certify", clamp: bool = False):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"smoothing: sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.n0 = _positive_int("n0", n0)
        self.n = _positive_int("n", n)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ValueError(f"smoothing: alpha must lie in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        if mode not in ("certify", "predict"):
            raise ValueError(f"smoothing: mode must be 'certify' or 'predict', got {mode!r}")
        self.mode = mode
        if not isinstance(clamp, bool):
            raise ValueError(f"smoothing: clamp must be a bool, got {clamp!r}")
        self.clamp = clamp

    @property
    def copies(self) -> int:
        return self.n0 + self.n if self.mode == "certify" else self.n

    def expand(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="smoothing")
        # CERTIFY: rows i*T .. i*T+n0-1 select c_A, the following n estimate p_A.
        return noisy_copies(x, self.copies, self.sigma, generator, self.clamp)  # [N*T, C, H, W]

    def aggregate(self, logits: torch.Tensor) -> EnsembleResult:
        if logits.dim() != 2 or logits.shape[0] % self.copies:
            raise ValueError(f"smoothing: expected [N*{self.copies}, K] logits, got shape {tuple(logits.shape)}")
        k = logits.shape[1]
        per_item = logits.view(-1, self.copies, k)  # [N, T, K]
        if self.mode == "certify":
            counts0 = vote_counts(per_item[:, : self.n0].reshape(-1, k), self.n0)  # [N, K]
            counts = vote_counts(per_item[:, self.n0:].reshape(-1, k), self.n)  # [N, K]
            prediction, radius = certify_from_counts(counts0, counts, self.alpha, self.sigma)
        else:
            if k < 2:
                raise ValueError(f"smoothing: PREDICT needs at least 2 classes, got {k}")
            counts = vote_counts(logits, self.n)
            prediction, radius = predict_from_counts(counts, self.alpha), None
        probs = counts.to(torch.float32) / counts.sum(1, keepdim=True)  # [N, K]
        return EnsembleResult(probs=probs.to(logits.device), abstain=prediction == ABSTAIN, radius=radius)
