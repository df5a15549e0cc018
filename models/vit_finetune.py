"""Adversarial fine-tuning of a (pre-trained) ``vit_tiny`` with the MAE / MIMIR recipe.

The recipe of the MIMIR reference scripts (github.com/xiaoyunxxy/MIMIR ``finetune.py`` and
``advmae_jobscript_cifar10.sh``, which follow facebookresearch/mae ``main_finetune.py``; read,
not copied): AdamW, layer-wise learning-rate decay 0.65 (``param_groups_lrd``, BEiT / ELECTRA),
weight decay 0.05 (none on biases, norms, position embeddings and the class token), drop-path
0.1, base lr 0.01 per 256 images with linear warm-up over 10% of the run (5 of 50 epochs) then a
half cosine to ``min_lr`` 1e-6, a global-average-pooled head, and PGD-10 adversarial examples
for every training batch (PGD-AT, Madry et al. 2018).

Left out on purpose (say so when quoting results): mixup 0.8 / cutmix 1.0 / random erasing 0.25
and label smoothing 0.1 of the reference script -- augmentations for 32x32 CIFAR, not part of
the issue's recipe; ``label_smoothing`` is available.

Shapes: ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]`` int64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robustgate.models.inner import pgd

REFERENCE = dict(blr=0.01, layer_decay=0.65, weight_decay=0.05, drop_path=0.1, warmup_fraction=5 / 50, min_lr=1e-6,
                 steps=10, pool="mean")


def layer_id(name: str, depth: int) -> int:
    """Layer of a ``vit_tiny`` parameter for layer-wise decay (MAE's ``get_layer_id_for_vit``).

    Embeddings (``patch_embed``, ``cls_token``, ``pos_embed``, ``normalize``) are layer 0, block i
    is layer i + 1, everything after the blocks (``norm``, ``pre_logits``, ``head``) is depth + 1.
    """
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "normalize")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay: layer l gets ``lr_scale = decay^(depth+1-l)``.

    No weight decay on 1-D parameters (biases, norm weights) nor on ``pos_embed`` / ``cls_token``
    (MAE's ``no_weight_decay``). Frozen parameters (a fixed sin-cos ``pos_embed``) are skipped.
    Each group carries ``lr_scale``; ``finetune`` multiplies the scheduled lr by it.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
        lid = layer_id(name, depth)
        g = groups.setdefault((lid, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid,
        })
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then half cosine from ``lr`` to ``min_lr`` (MAE lr_sched)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class FinetuneResult:
    """Per-``log_every`` window: mean training loss / accuracy (on the adversarial batch); timings."""

    loss: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    config: dict = field(default_factory=dict)


def finetune(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 128, eps: float = 0.1,
    pgd_steps: int = REFERENCE["steps"], alpha: float | None = None, blr: float = REFERENCE["blr"],
    layer_decay: float = REFERENCE["layer_decay"], weight_decay: float = REFERENCE["weight_decay"],
    warmup_fraction: float = REFERENCE["warmup_fraction"], min_lr: float = REFERENCE["min_lr"],
    label_smoothing: float = 0.0, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
    log_every: int = 50,
) -> FinetuneResult:
    """PGD-AT fine-tuning of ``model`` (a ``vit_tiny``; its ``drop_path`` / ``pool`` are set when it
    is built) for ``steps`` batches drawn from ``x`` / ``y`` (reshuffled each pass, seeded).

    lr = ``blr * batch_size / 256`` scaled per layer by ``param_groups_lrd``; PGD-``pgd_steps`` of
    step ``alpha`` (default 2.5 eps / steps) with a random start, l-inf ``eps``. ``layer_decay=1``
    is plain AdamW (the from-scratch baseline). Leaves the model in eval mode on ``device``.
    """
    if steps < 1 or batch_size < 1 or pgd_steps < 1:
        raise ValueError(f"steps, batch_size and pgd_steps must be >= 1, got {steps}, {batch_size}, {pgd_steps}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0 for adversarial fine-tuning, got {eps}")
    if len(x) < batch_size:
        raise ValueError(f"{len(x)} training items are fewer than one batch of {batch_size}")
    alpha = 2.5 * eps / pgd_steps if alpha is None else alpha
    lr = blr * batch_size / 256
    config = dict(steps=steps, batch_size=batch_size, eps=eps, pgd_steps=pgd_steps, alpha=alpha, blr=blr, lr=lr,
                  layer_decay=layer_decay, weight_decay=weight_decay, warmup_fraction=warmup_fraction, min_lr=min_lr,
                  label_smoothing=label_smoothing, seed=seed, device=str(device))
    model.to(device)
    device = next(model.parameters()).device
    groups = param_groups_lrd(model, weight_decay, layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    attack_gen = torch.Generator(device=device).manual_seed(seed + 1)
    warmup = int(warmup_fraction * steps)
    result, perm, pos = FinetuneResult(config=config), torch.randperm(len(x), generator=order_gen), 0
    window = [0.0, 0.0, 0]
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="PGD-AT fine-tune", disable=not progress, leave=False):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=order_gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        xb, yb = x[idx].to(device), y[idx].to(device)
        scheduled = lr_at(step, steps, warmup, lr, min_lr)
        for g in opt.param_groups:
            g["lr"] = scheduled * g["lr_scale"]
        x_adv = pgd(model, xb, yb, eps, alpha, pgd_steps, generator=attack_gen)  # eval mode inside
        model.train()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window[0] += loss.item()
        window[1] += (logits.argmax(1) == yb).float().mean().item()
        window[2] += 1
        if window[2] == log_every or step == steps - 1:
            result.loss.append(window[0] / window[2])
            result.acc.append(window[1] / window[2])
            window = [0.0, 0.0, 0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds, result.steps = time.perf_counter() - t0, steps
    model.eval()
    return result
