"""Inner maximizations for adversarial training, and PGD for model selection / evaluation.

All attacks are l-inf, in pixel space: every returned ``x_adv`` satisfies
``|x_adv - x| <= eps`` and ``lo <= x_adv <= hi`` (the box, ``[0, 1]`` by default) -- ``project``
enforces both after every step, and the tests assert it.

- ``fgsm_rs``: FGSM from a uniform random start (Wong, Rice & Kolter 2020, "Fast is better than
  free"), step ``alpha`` ~ 1.25 eps. Known limit: *catastrophic overfitting* -- at large steps or
  long schedules FGSM-trained models can suddenly lose all PGD robustness; select models on
  validation PGD accuracy (the trainer does) to catch it.
- ``pgd``: projected gradient ascent on the cross-entropy with random start and restarts, the
  worst restart kept per item (Madry et al. 2018).
- ``trades_inner``: maximizes KL(f(x) || f(x')) from x + 0.001 N(0, I) (Zhang et al. 2019).

These are the trainer's own attacks: the red team's ``attacks/`` package is a separate,
independent implementation (so a bug cannot hide itself in both the training and the
evaluation). The model's train/eval mode is set to eval during the attack and restored after
(as TRADES's reference code does), and only the input gets gradients (``torch.autograd.grad``),
so parameter gradients are untouched.

Shapes: ``x`` ``[N, C, H, W]``, ``y`` ``[N]`` int64; returns ``[N, C, H, W]`` (detached).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, box: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Closest point of the l-inf eps-ball around ``x`` intersected with the box."""
    return torch.max(torch.min(x_adv, x + eps), x - eps).clamp_(*box)


@contextmanager
def eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _check(eps: float, alpha: float, steps: int = 1, restarts: int = 1) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if alpha <= 0:
        raise ValueError(f"step size alpha must be > 0, got {alpha}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")


def _uniform(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
    return (2 * u.to(x.device) - 1) * eps


def fgsm_rs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
    box: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One signed-gradient step of size ``alpha`` from a uniform start in the eps-ball."""
    _check(eps, alpha)
    with eval_mode(model):
        x_adv = project(x + _uniform(x, eps, generator), x, eps, box).requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        return project(x_adv.detach() + alpha * grad.sign(), x, eps, box)


def pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
    restarts: int = 1, random_start: bool = True, box: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l-inf PGD on the cross-entropy; over ``restarts`` keeps, per item, a restart that fools
    the model (else the one with the highest loss)."""
    _check(eps, alpha, steps, restarts)
    with eval_mode(model):
        best = x.clone()
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            x_adv = project(x + _uniform(x, eps, generator), x, eps, box) if random_start else x.clone()
            for _ in range(steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = project(x_adv.detach() + alpha * grad.sign(), x, eps, box)
            with torch.no_grad():
                logits = model(x_adv)
                loss_i = F.cross_entropy(logits, y, reduction="none")  # [N]
                fooled = logits.argmax(1) != y
                # better = fools where the best so far does not, or same fooled-status and higher loss
                better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss_i > best_loss))
                best[better] = x_adv[better]
                best_loss = torch.where(better, loss_i, best_loss)
                best_fooled |= fooled
        return best.detach()


def trades_inner(
    model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
    box: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximizes ``KL(softmax f(x) || softmax f(x'))`` over the eps-ball (TRADES, Zhang et al. 2019)."""
    _check(eps, alpha, steps)
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)  # [N, K]
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
        x_adv = project(x + 0.001 * noise.to(x.device), x, eps, box)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + alpha * grad.sign(), x, eps, box)
        return x_adv.detach()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).argmax(1) == y).float()


def robust_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
    restarts: int = 1, batch_size: int = 500, seed: int = 0, progress: bool = False,
) -> tuple[float, float]:
    """(clean accuracy, PGD accuracy) over ``x``; an item counts as robust only if it is
    classified correctly both clean and under attack."""
    from tqdm import tqdm

    gen = torch.Generator(device=x.device).manual_seed(seed)
    clean = robust = 0.0
    batches = range(0, len(x), batch_size)
    for i in tqdm(batches, desc=f"PGD-{steps} eval", disable=not progress, mininterval=5):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        ok = _accuracy(model, xb, yb)
        clean += ok.sum().item()
        if eps > 0:
            x_adv = pgd(model, xb, yb, eps, alpha, steps, restarts, generator=gen)
            robust += (ok * _accuracy(model, x_adv, yb)).sum().item()
        else:
            robust += ok.sum().item()
    return clean / len(x), robust / len(x)
