"""Square Attack (l-inf), black-box, through the served pipeline's answers only.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020. Random search over the vertices of the l-inf
ball: start from vertical stripes of +-eps, then repeatedly redraw one square window of side
``s`` (one random sign per channel) and keep the change only if the margin loss decreases; the
window area ``p * H * W`` shrinks on the paper's schedule.

Written here rather than taken from torchattacks because the attacker sees what the proxy
answers, not a logits function: a rejected query (PERMISSION_DENIED from the gRPC endpoint, or a
REJECTED verdict from the local served pipeline) carries no logits and counts as a failed query
with loss +inf, and every query is charged against a per-item budget.

Variables -> paper: ``x`` (x), ``delta`` (delta, entries in {-eps, +eps}), ``margin`` (L, the
margin loss ``z_y - max_{j != y} z_j``; success when < 0 on an accepted answer), ``p``
(p, fraction of pixels changed), ``s`` (window side). Known limit: a randomized pipeline makes
the loss noisy; the attack keeps the best *observed* loss (no resampling).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from robustgate.attacks.joint import margin_loss
from robustgate.defenses.assemble import PipelineRunner
from robustgate.defenses.pipeline import REJECTED


class QueryOracle(Protocol):
    """Answers queries like the proxy does: ``x`` ``[M, C, H, W]`` -> (logits ``[M, K]`` with NaN
    rows for rejected items, rejected ``[M]`` bool). Each item is one query."""

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class LocalOracle:
    """The served pipeline in process (the proxy's own runner, defenses/assemble.py), answered per item."""

    def __init__(self, model: PipelineRunner):
        self.model = model

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = self.model(x)
        rejected = out.verdict == REJECTED
        logits = out.logits.float().clone()
        logits[rejected] = float("nan")  # the attacker never sees a rejected item's logits
        return logits, rejected


def p_schedule(p_init: float, it: int, budget: int) -> float:
    """The paper's piecewise-constant schedule, rescaled from 10,000 queries to ``budget``."""
    it = int(it / budget * 10000)
    for bound, factor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                          (4000, 64), (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / factor
    return p_init / 512


def _loss(oracle: QueryOracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[M]`` margin loss; +inf where the query was rejected (a failed query)."""
    logits, rejected = oracle(x)
    loss = torch.full((len(x),), float("inf"))
    ok = ~rejected
    if ok.any():
        loss[ok] = margin_loss(logits[ok], y[ok], kappa=float("inf"))  # unclipped: < 0 = fooled
    return loss


class SquareLinf:
    """Args: eps (l-inf radius), queries (budget per item, including the initial one),
    p_init (initial fraction of pixels per window; the paper uses 0.05 on CIFAR/ImageNet and
    0.3 on MNIST), seed."""

    def __init__(self, oracle: QueryOracle, eps: float, queries: int = 1000, p_init: float = 0.3, seed: int = 0):
        if eps < 0 or queries < 1 or not 0 < p_init <= 1:
            raise ValueError(f"SquareLinf: need eps >= 0, queries >= 1, 0 < p_init <= 1; got {eps}, {queries}, {p_init}")
        self.oracle, self.eps, self.queries, self.p_init, self.seed = oracle, eps, queries, p_init, seed
        self.queries_used: torch.Tensor | None = None  # [N] after a call

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]`` -> adversarial ``[N, C, H, W]``."""
        gen = torch.Generator().manual_seed(self.seed)
        n, c, h, w = x.shape
        eps = self.eps
        # 1. vertical stripes init: one sign per (item, channel, column)
        signs = torch.randint(0, 2, (n, c, 1, w), generator=gen).float() * 2 - 1
        x_best = (x + eps * signs).clamp(0, 1)  # [N, C, H, W]
        loss_best = _loss(self.oracle, x_best, y)  # [N]
        used = torch.ones(n, dtype=torch.long)
        for it in range(1, self.queries):
            active = loss_best >= 0  # not yet a misclassified accepted answer
            if not active.any():
                break
            idx = torch.nonzero(active).flatten()
            # 2. window side from the schedule
            p = p_schedule(self.p_init, it, self.queries)
            s = max(1, min(h, w, int(round(math.sqrt(p * h * w)))))
            xa, xb = x[idx], x_best[idx]
            delta = xb - xa  # current perturbation of the active items
            cand = delta.clone()
            for k in range(len(idx)):
                r0 = int(torch.randint(0, h - s + 1, (1,), generator=gen))
                c0 = int(torch.randint(0, w - s + 1, (1,), generator=gen))
                window = delta[k, :, r0:r0 + s, c0:c0 + s]
                # 3. redraw the window until it differs from the current one (as in the paper)
                for _ in range(10):
                    new = (torch.randint(0, 2, (c, 1, 1), generator=gen).float() * 2 - 1) * eps
                    if not torch.all((window - new).abs() < 1e-7):
                        break
                cand[k, :, r0:r0 + s, c0:c0 + s] = new
            x_new = (xa + cand).clamp(0, 1)
            # the box clamp can only shrink |delta|, so x_new stays in the eps-ball
            loss_new = _loss(self.oracle, x_new, y[idx])
            used[idx] += 1
            # 4. keep improvements only
            better = loss_new < loss_best[idx]
            x_best[idx[better]] = x_new[better]
            loss_best[idx[better]] = loss_new[better]
        self.queries_used = used
        return x_best
