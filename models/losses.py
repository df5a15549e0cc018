"""Training objectives by method name: ``METHODS[name](model, x, y, cfg, generator) -> (loss, logits)``.

Each returns the scalar loss to minimize and the logits whose accuracy the progress bar shows
(on the adversarial inputs for adversarial methods). ``cfg`` provides ``eps``, ``alpha``,
``steps``, ``restarts``, ``beta``, ``noise_sigma``.

- ``standard``: cross-entropy on clean inputs.
- ``fast-at``: cross-entropy on FGSM-RS examples (Wong, Rice & Kolter 2020), step ``alpha``
  (they recommend 1.25 eps). Risk: catastrophic overfitting (select on validation PGD).
- ``pgd-at``: cross-entropy on PGD examples (Madry et al. 2018), ``steps`` x ``alpha``,
  ``restarts``.
- ``trades``: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximizing the KL (Zhang et al. 2019;
  beta = 6 in the paper, 1/lambda). Clean and adversarial inputs go through the model in one
  concatenated forward pass (identical for models without batch norm; with batch norm the batch
  statistics mix both halves, unlike the reference code's two passes).
- ``mart``: boosted CE on PGD examples + beta * KL(f(x) || f(x')) weighted by 1 - p_y(x), which
  emphasizes misclassified clean examples (Wang et al. 2020; beta = 6 in the paper).

``noise_sigma > 0`` adds Gaussian noise N(0, sigma^2) (not clipped, as Cohen et al. 2019) to
every input the loss sees, after the inner attack: with ``standard`` this is exactly the Gaussian
data augmentation randomized-smoothing base classifiers need.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from robustgate.models.inner import fgsm_rs, pgd, trades_inner


class LossConfig(Protocol):
    eps: float
    alpha: float
    steps: int
    restarts: int
    beta: float
    noise_sigma: float


def _noisy(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    if sigma <= 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
    return x + sigma * noise.to(x.device)


def _attack_model(model: nn.Module) -> nn.Module:
    """The inner attack runs on the bare module (a DistributedDataParallel wrapper would expect
    a parameter backward pass after each of its forwards)."""
    return getattr(model, "module", model)


def standard_loss(model, x, y, cfg: LossConfig, generator=None):
    logits = model(_noisy(x, cfg.noise_sigma, generator))
    return F.cross_entropy(logits, y), logits


def fast_at_loss(model, x, y, cfg: LossConfig, generator=None):
    x_adv = fgsm_rs(_attack_model(model), x, y, cfg.eps, cfg.alpha, generator=generator)
    logits = model(_noisy(x_adv, cfg.noise_sigma, generator))
    return F.cross_entropy(logits, y), logits


def pgd_at_loss(model, x, y, cfg: LossConfig, generator=None):
    x_adv = pgd(_attack_model(model), x, y, cfg.eps, cfg.alpha, cfg.steps, cfg.restarts, generator=generator)
    logits = model(_noisy(x_adv, cfg.noise_sigma, generator))
    return F.cross_entropy(logits, y), logits


def trades_loss(model, x, y, cfg: LossConfig, generator=None):
    x_adv = trades_inner(_attack_model(model), x, cfg.eps, cfg.alpha, cfg.steps, generator=generator)
    both = model(_noisy(torch.cat([x, x_adv]), cfg.noise_sigma, generator))  # [2N, K]
    logits_nat, logits_adv = both.chunk(2)
    # KL(p_nat || p_adv), summed over classes, averaged over the batch
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_nat, y) + cfg.beta * kl, logits_adv


def mart_loss(model, x, y, cfg: LossConfig, generator=None):
    x_adv = pgd(_attack_model(model), x, y, cfg.eps, cfg.alpha, cfg.steps, cfg.restarts, generator=generator)
    both = model(_noisy(torch.cat([x, x_adv]), cfg.noise_sigma, generator))  # [2N, K]
    logits_nat, logits_adv = both.chunk(2)
    p_adv = F.softmax(logits_adv, dim=1)  # [N, K]
    # Boosted CE (BCE in the paper): CE + -log(1 - max_{k != y} p_k(x'))
    top2 = p_adv.argsort(dim=1)[:, -2:]  # [N, 2]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # [N]
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), runner_up)
    p_nat = F.softmax(logits_nat, dim=1)
    p_true = p_nat.gather(1, y[:, None]).squeeze(1)  # [N]
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)  # [N]  KL(p_nat || p_adv)
    return bce + cfg.beta * (kl * (1.0000001 - p_true)).mean(), logits_adv


METHODS: dict[str, Callable] = {
    "standard": standard_loss,
    "fast-at": fast_at_loss,
    "pgd-at": pgd_at_loss,
    "trades": trades_loss,
    "mart": mart_loss,
}

#: forward+backward passes per training item (for throughput accounting), given inner steps
def passes_per_item(method: str, steps: int, restarts: int = 1) -> int:
    return {"standard": 1, "fast-at": 2, "pgd-at": steps * restarts + 1, "trades": steps + 2, "mart": steps * restarts + 2}[method]
