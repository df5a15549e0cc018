"""MIMIR adversarial masked-image-modeling pre-training (and its clean-MAE baseline).

Xu, Yu, Liu/Wu, Picek, "MIMIR: Masked Image Modeling for Mutual Information-based Adversarial
Robustness" (arXiv 2312.04960). A masked autoencoder (``models/mae.py``) is pre-trained with an
adversarial input: each batch,

1. draw one random masking (75% of the patches removed);
2. PGD (l-inf, [0, 1] box) finds delta, ||delta||_inf <= eps, that *maximizes* the
   reconstruction loss when the encoder sees x + delta and the decoder must rebuild the clean x
   (the same masking is used for every PGD step and for the training step, as in the reference
   code's fast variant ``pgd_mae_fast.py``);
3. the model is trained on  loss = MSE(x, x_rec) + lambda * I(x + delta, z),  where z is the
   encoder's latent (cls + visible tokens, flattened) and the mutual information I is estimated
   by HSIC with Gaussian kernels (``models/hsic.py``).

The encoder is then fine-tuned adversarially (PGD-AT / TRADES) as a ``vit_tiny`` classifier:
``init_classifier(classifier, checkpoint)`` copies the pre-trained encoder into it.

Clean MAE pre-training (He et al. 2022, the baseline) is the same loop with ``eps=0, lam=0``.

Paper symbols -> code: x -> ``x``; delta -> ``delta``; epsilon -> ``eps``; alpha (PGD step) ->
``step_size``; PGD iterations -> ``steps``; mask ratio -> ``MaskedAutoencoder.mask_ratio``;
z (latent of the adversarial input) -> ``latent.flatten(1)``; x_re -> ``pred``; lambda (weight
of the MI penalty, ``--mi_xpl`` in the reference code) -> ``lam``; sigma (HSIC kernel width) ->
``sigma``.

Defaults (``PAPER_DEFAULTS``) follow the reference code (github.com/xiaoyunxxy/MIMIR,
``pretrain.py`` and ``advmae_jobscript_cifar10.sh``, CIFAR-10 ViT): eps = 8/255, one PGD step of
alpha = 0.0392 (10/255) from a uniform random start, lambda = 1e-5 on the normalized-CCA HSIC
with sigma = 5, mask ratio 0.75, AdamW(betas 0.9/0.95, weight decay 0.05), base lr 1.5e-4 per
256 images (``scaled_lr``), 800 epochs with 40 warm-up epochs (cosine schedule), normalized-pixel
targets. ``pretrain`` uses them except for sigma, whose default is the median heuristic (sigma 5 on
[0, 1] pixels makes the kernel near constant), and lambda, which is to be calibrated
(``bench/training/mimir_compare.py sweep``; the MI term's share of the loss is logged every epoch).
For Fashion-MNIST the threat model of this project is eps = 0.1 (see docs/MIMIR.md).

Known limits: the robustness comes from the adversarial *fine-tuning*; pre-training alone gives
no robust classifier. The MI penalty is an HSIC proxy, not a bound. One PGD step per batch makes
pre-training cost roughly one extra forward/backward over MAE's (the paper reports 18.4 s vs
16.1 s per CIFAR-10 epoch on GPUs; measured here 1.67x per batch on an H200 and ~1.9x on a CPU,
see docs/MIMIR.md).

``perturbation="carry"`` (an option, not the reference's recipe) removes that extra pass: each
training image keeps its delta from one epoch to the next, and the training step's own backward
pass, which computes the input gradient almost for free, moves it by one signed step after the
update -- the gradient reuse of "Adversarial training for free!" (Shafahi et al., NeurIPS 2019)
with the per-example perturbations carried across epochs of ATTA (Zheng et al., CVPR 2020). Two
differences from step 2 above: the step the model trains on was taken against the model of the
image's previous visit (one epoch old), and it ascends the whole training loss (reconstruction +
lambda * MI, whose MI part is ~1% of it) rather than the reconstruction alone. Its cost per
epoch: ``bench/results/training.mimir_compare.cost.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from robustgate.models.hsic import ESTIMATORS
from robustgate.models.mae import MaskedAutoencoder, Masking

PAPER_DEFAULTS = dict(
    eps=8 / 255, steps=1, step_size=0.0392, lam=1e-5, sigma=5.0, estimator="nhsic_cca",
    lr=1.5e-4, blr=1.5e-4, weight_decay=0.05, mask_ratio=0.75, warmup_fraction=40 / 800, norm_pix_loss=True,
)
# sigma=None (median heuristic) is pretrain's default instead of the reference's 5: with the
# per-dimension width exp(-||a - b||^2 / (2 sigma^2 d)), sigma 5 on [0, 1] pixels gives
# exp(-msd / 50) with msd the mean squared pixel difference (~0.1 between Fashion-MNIST images),
# i.e. every kernel entry ~0.998: a near-constant kernel (docs/MIMIR.md, "sigma").


def scaled_lr(blr: float, batch_size: int) -> float:
    """The reference's absolute learning rate: ``blr * batch_size / 256`` (MAE's linear scaling)."""
    return blr * batch_size / 256
METHODS = ("mimir-pretrain", "mae-pretrain")
# pretrain(perturbation=...): the reference's PGD step, or deltas carried across epochs (module docstring)
PERTURBATIONS = ("pgd", "carry")
CARRY = "mimir-pretrain-carry"  # _compare's name for mimir-pretrain with perturbation "carry"


# ---------------------------------------------------------------------------------------------
# tensor math
# ---------------------------------------------------------------------------------------------
def pgd_delta(
    model: MaskedAutoencoder, x: torch.Tensor, masking: Masking, *, eps: float, steps: int,
    step_size: float, random_start: bool = True, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l-inf PGD maximizing ``MSE(x, dec(enc(x + delta)))`` on the masked patches of ``masking``.

    x: [N, C, H, W] in [0, 1] -> delta [N, C, H, W], ``|delta| <= eps`` and ``x + delta`` in [0, 1].
    Only the input gradient is computed (no parameter gradients accumulate).
    """
    x = x.detach()
    if eps == 0 or steps == 0:
        return torch.zeros_like(x)
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device)  # [N, C, H, W] in [0, 1)
        delta = (2 * noise - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = model(x, x_in=x + delta, masking=masking)[0]
        (grad,) = torch.autograd.grad(loss, delta)
        delta = ascend(x, delta.detach(), grad, eps=eps, step_size=step_size)
    return delta.detach()


def ascend(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, *, eps: float, step_size: float) -> torch.Tensor:
    """One signed l-inf ascent step: ``delta + step_size * sign(grad)`` projected on the eps-ball and
    the [0, 1] box around ``x``; all ``[N, C, H, W]``. (A zero gradient -- a masked patch's pixels --
    leaves its pixels where they were.)"""
    delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def mimir_loss(
    model: MaskedAutoencoder, x: torch.Tensor, delta: torch.Tensor, masking: Masking, *, lam: float,
    sigma: float | None, estimator: str = "nhsic_cca",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, rec, mi)``: loss = MSE(x, x_rec | x + delta) + lam * HSIC(x + delta, z).

    ``mi`` is NaN when ``lam == 0`` (not computed, so the MAE baseline pays nothing for it). When
    ``delta`` requires grad (``perturbation="carry"``), the backward pass of ``loss`` also fills
    ``delta.grad`` through the model; the MI term's first argument never carries a gradient.
    """
    x_adv = x.detach() + delta  # [N, C, H, W]; keeps delta's graph only when delta requires grad
    rec, _, _, latent = model(x, x_in=x_adv, masking=masking)  # latent [N, 1 + K, dim]
    if lam == 0:
        return rec, rec.detach(), torch.tensor(float("nan"))
    # the MI term's gradient goes to the encoder (through z), not to the input directly
    mi = ESTIMATORS[estimator](x_adv.detach().flatten(1), latent.flatten(1), sigma_x=sigma, sigma_y=sigma)
    return rec + lam * mi, rec.detach(), mi.detach()


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up for ``warmup`` steps, then half-cycle cosine to 0 (MAE's lr_sched)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters), as timm/MAE do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    """Per-epoch means: ``losses`` (total), ``rec_losses``, ``mi`` (NaN for MAE), ``mi_share``
    (``lam * mi / loss``: the MI term's share of the loss, 0 for MAE); timing and throughput."""

    losses: list[float] = field(default_factory=list)
    rec_losses: list[float] = field(default_factory=list)
    mi: list[float] = field(default_factory=list)
    mi_share: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall clock per epoch
    pgd_seconds: list[float] = field(default_factory=list)  # wall clock of the PGD step (pgd_delta) per epoch
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time per epoch (all threads)
    images_per_s: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def pretrain(
    model: MaskedAutoencoder,
    loader: Iterable,
    *,
    epochs: int,
    eps: float = PAPER_DEFAULTS["eps"],
    steps: int = PAPER_DEFAULTS["steps"],
    step_size: float = PAPER_DEFAULTS["step_size"],
    lam: float = PAPER_DEFAULTS["lam"],
    sigma: float | None = None,
    estimator: str = PAPER_DEFAULTS["estimator"],
    lr: float = PAPER_DEFAULTS["lr"],
    weight_decay: float = PAPER_DEFAULTS["weight_decay"],
    warmup_epochs: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint: str | Path | None = None,
    perturbation: str = "pgd",
) -> PretrainResult:
    """MIMIR pre-training of ``model`` over ``loader`` (batches of images or ``(images, labels)``).

    ``eps=0, lam=0`` is clean MAE pre-training. ``lr`` is absolute (``scaled_lr(blr, batch)`` gives
    the reference's); it warms up linearly over ``warmup_epochs`` (None: the reference's 40 of
    800 = 5% of the run), then follows a half cosine to 0. ``sigma=None``: HSIC kernel widths by
    the median heuristic. ``max_steps`` stops (and ends the schedule) after that many batches.
    Masks and PGD starts come from a generator seeded with ``seed``; the loader's order is the
    caller's (seed it too for a reproducible run). The model is left in train mode on ``device``.
    ``checkpoint``: safetensors path written at the end. ``perturbation``: ``"pgd"`` (the reference's
    ``steps`` PGD steps per batch) or ``"carry"`` (module docstring: one delta per training image,
    moved by the training step's own input gradient; needs ``steps == 1`` and a loader of
    ``(images, indices)``, ``make_loader(..., indexed=True)``); ``pgd_seconds`` then times the
    gather and update of the carried deltas.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if eps < 0 or steps < 0 or step_size < 0:
        raise ValueError(f"eps, steps and step_size must be >= 0, got {eps}, {steps}, {step_size}")
    if eps > 0 and (steps == 0 or step_size == 0):
        raise ValueError(f"eps={eps} needs steps >= 1 and step_size > 0, got {steps}, {step_size}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    carry = perturbation == "carry"
    if carry and (eps == 0 or steps != 1):
        raise ValueError(f"perturbation 'carry' takes one step per visit of an image with eps > 0: got eps={eps}, "
                         f"steps={steps}")
    n_items = len(getattr(loader, "dataset", ())) if carry else 0
    if carry and n_items == 0:
        raise ValueError("perturbation 'carry' needs a loader with a dataset of (images, indices): "
                         "make_loader(..., indexed=True)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"sigma must be positive or None (median heuristic), got {sigma}")
    batches_per_epoch = len(loader) if hasattr(loader, "__len__") else None
    default_warmup = warmup_epochs is None
    if default_warmup:
        warmup_epochs = PAPER_DEFAULTS["warmup_fraction"] * epochs
    config = dict(epochs=epochs, eps=eps, steps=steps, step_size=step_size, lam=lam,
                  sigma="median" if sigma is None else sigma, estimator=estimator, lr=lr, weight_decay=weight_decay,
                  warmup_epochs=warmup_epochs, max_steps=max_steps, seed=seed, device=str(device), perturbation=perturbation,
                  method="mimir-pretrain" if (eps > 0 or lam > 0) else "mae-pretrain")
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    total = epochs * batches_per_epoch if batches_per_epoch else None
    if max_steps is not None:
        total = min(total, max_steps) if total else max_steps
    warmup = int(warmup_epochs * batches_per_epoch) if batches_per_epoch else 0
    if default_warmup and total:  # 5% of the steps actually run (max_steps may end the run early)
        warmup = int(PAPER_DEFAULTS["warmup_fraction"] * total)
    result, step = PretrainResult(config=config), 0
    carried = None  # perturbation "carry": [n_items, C, H, W], every image's delta, on the device

    for epoch in range(epochs):
        if max_steps is not None and step >= max_steps:
            break
        sums, n_images, t0, c0, t_pgd = [0.0, 0.0, 0.0, 0.0], 0, time.perf_counter(), time.process_time(), 0.0
        bar = tqdm(loader, desc=f"{config['method']} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            if max_steps is not None and step >= max_steps:
                break
            x = _images(batch).to(device)  # [N, C, H, W] in [0, 1]
            if carry:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and not batch[1].is_floating_point()):
                    raise ValueError("perturbation 'carry' needs batches of (images, indices): "
                                     "make_loader(..., indexed=True)")
                idx = batch[1].to(device)  # [N] positions in the loader's dataset
                if carried is None:  # a uniform random start, as PGD's, drawn once per image
                    noise = torch.rand((n_items, *x.shape[1:]), generator=gen).to(device)
                    carried = (2 * noise - 1) * eps
            if total:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, lr)
            # 1. one masking per batch, shared by the attack and the update
            masking = model.sample_masking(x.shape[0], generator=gen)
            # 2. the perturbation that hurts reconstruction most (timed: the PGD step's share)
            _sync(device)
            tp = time.perf_counter()
            if carry:  # this image's delta from its previous visit; the backward pass below moves it
                delta = ((x + carried[idx]).clamp(0, 1) - x).requires_grad_(True)
            else:
                delta = pgd_delta(model, x, masking, eps=eps, steps=steps, step_size=step_size, generator=gen)
            _sync(device)
            t_pgd += time.perf_counter() - tp
            # 3. reconstruct the clean image from the perturbed one, penalize I(x + delta, z)
            loss, rec, mi = mimir_loss(model, x, delta, masking, lam=lam, sigma=sigma, estimator=estimator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1} step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if carry:
                tp = time.perf_counter()
                with torch.no_grad():
                    carried[idx] = ascend(x, delta.detach(), delta.grad, eps=eps, step_size=step_size)
                _sync(device)
                t_pgd += time.perf_counter() - tp
            b = x.shape[0]
            mi_term = lam * mi.item() if lam > 0 else 0.0
            sums[0] += loss.item() * b
            sums[1] += rec.item() * b
            sums[2] += mi.item() * b
            sums[3] += mi_term / max(loss.item(), 1e-12) * b
            n_images += b
            step += 1
            bar.set_postfix(rec=f"{rec.item():.4f}", mi=f"{mi.item():.3g}", mi_share=f"{sums[3] / n_images:.2%}")
        if n_images == 0:
            raise ValueError("the loader yielded no batches")
        _sync(device)
        seconds = time.perf_counter() - t0
        result.losses.append(sums[0] / n_images)
        result.rec_losses.append(sums[1] / n_images)
        result.mi.append(sums[2] / n_images)
        result.mi_share.append(sums[3] / n_images)
        result.pgd_seconds.append(t_pgd)
        result.seconds.append(seconds)
        result.cpu_seconds.append(time.process_time() - c0)
        result.images_per_s.append(n_images / seconds)
    if checkpoint is not None:
        save_pretrained(model, checkpoint, extra={"pretrain": config})
    return result


def _sync(device: torch.device) -> None:
    """Waits for queued CUDA work so wall-clock timings are true (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(x: torch.Tensor, batch_size: int, seed: int = 0, indexed: bool = False) -> torch.utils.data.DataLoader:
    """A shuffled, seeded loader over in-memory images [N, C, H, W] (drop_last, as MAE); batches are
    ``(images,)``, or ``(images, indices [B])`` with ``indexed`` (``pretrain(perturbation="carry")``)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = (x, torch.arange(len(x))) if indexed else (x,)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=batch_size, shuffle=True, drop_last=True, generator=gen,
    )


# ---------------------------------------------------------------------------------------------
# checkpoints and the hand-over to the classifier
# ---------------------------------------------------------------------------------------------
def save_pretrained(model: MaskedAutoencoder, path: str | Path, extra: dict | None = None) -> str:
    """Writes the whole MAE as safetensors (config in the metadata); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "robustgate-mae", "mae_config": json.dumps(model.config), "extra": json.dumps(extra or {})}
    save_file(tensors, str(path), metadata=meta)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_pretrained(path: str | Path) -> MaskedAutoencoder:
    """Rebuilds the MAE saved by ``save_pretrained`` (eval mode, CPU)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "robustgate-mae":
        raise ValueError(f"{path} is not a robustgate MAE checkpoint (metadata format={meta.get('format')!r})")
    config = json.loads(meta["mae_config"])
    config["mean"], config["std"] = tuple(config["mean"]), tuple(config["std"])
    config.setdefault("pos_embed", "learned")  # checkpoints written before sin-cos became the default
    model = MaskedAutoencoder(**config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def encoder_init(source: MaskedAutoencoder | str | Path) -> dict[str, torch.Tensor]:
    """The pre-trained encoder as initial weights of a ``vit_tiny`` classifier (classifier names)."""
    model = source if isinstance(source, MaskedAutoencoder) else load_pretrained(source)
    return model.encoder_state_dict()


def init_classifier(classifier: nn.Module, source: MaskedAutoencoder | str | Path) -> list[str]:
    """Loads the pre-trained encoder into a ``vit_tiny`` classifier in place (``--init PRETRAINED``).

    Every encoder tensor must exist in the classifier with the same shape; returns the classifier
    keys left at their own initialization (its ``pre_logits`` and ``head``).
    """
    weights = encoder_init(source)
    own = classifier.state_dict()
    for k, v in weights.items():
        if k not in own:
            raise ValueError(f"classifier has no parameter {k!r}; is it a vit_tiny with the encoder's config?")
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k!r}: classifier {tuple(own[k].shape)} vs encoder {tuple(v.shape)}")
    result = classifier.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected keys {result.unexpected_keys}")
    return sorted(result.missing_keys)


# ---------------------------------------------------------------------------------------------
# command line: pre-train (or time) MAE / MIMIR on a Fashion-MNIST subset
# ---------------------------------------------------------------------------------------------
def parse_sigma(text: str | float | None) -> float | None:
    """``"median"`` (or None) -> None (the median heuristic); else a positive float."""
    if text is None or str(text).lower() == "median":
        return None
    value = float(text)
    if value <= 0:
        raise ValueError(f"sigma must be positive or 'median', got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustgate.models.mimir", description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, default="mimir-pretrain")
    p.add_argument("--n", type=int, default=2048, help="training images (first n of the seeded train split)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=PAPER_DEFAULTS["steps"])
    p.add_argument("--step-size", type=float, default=0.125, help="1.25 eps, the paper's 10/255 for 8/255")
    p.add_argument("--lam", type=float, default=PAPER_DEFAULTS["lam"])
    p.add_argument("--sigma", type=parse_sigma, default=None,
                   help="HSIC kernel width, or 'median' (default: the median heuristic; the reference uses 5)")
    p.add_argument("--estimator", choices=sorted(ESTIMATORS), default=PAPER_DEFAULTS["estimator"])
    p.add_argument("--blr", type=float, default=PAPER_DEFAULTS["blr"], help="base lr; lr = blr * batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: 5%% of the epochs (40 of 800)")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="safetensors checkpoint to write")
    p.add_argument("--json", type=Path, default=None, help="write the PretrainResult here")
    p.add_argument("--perturbation", choices=PERTURBATIONS, default="pgd",
                   help="mimir-pretrain: the reference's PGD step (pgd) or deltas carried across epochs (carry)")
    p.add_argument("--compare", type=int, default=0, metavar="R",
                   help="time R alternating epochs of MAE, MIMIR and MIMIR with carried deltas (same data, same "
                        "contention) instead")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from robustgate.models.data import load_splits

    x = load_splits("fashion-mnist", seed=0).train_x[: args.n]
    if args.compare:
        return _compare(args, x)
    torch.manual_seed(args.seed)
    model = MaskedAutoencoder(dim=args.dim, depth=args.depth, heads=args.heads, patch_size=args.patch_size)
    mimir = args.method == "mimir-pretrain"
    result = pretrain(
        model, make_loader(x, args.batch_size, args.seed, indexed=mimir and args.perturbation == "carry"),
        epochs=args.epochs, perturbation=args.perturbation if mimir else "pgd",
        eps=args.eps if mimir else 0.0, steps=args.steps if mimir else 0, step_size=args.step_size if mimir else 0.0,
        lam=args.lam if mimir else 0.0, sigma=args.sigma, estimator=args.estimator,
        lr=args.lr or scaled_lr(args.blr, args.batch_size), warmup_epochs=args.warmup_epochs, seed=args.seed,
        device=args.device, checkpoint=args.out,
    )
    report = asdict(result)
    report["config"].update(n=args.n, batch_size=args.batch_size, dim=args.dim, depth=args.depth, heads=args.heads,
                            threads=torch.get_num_threads())
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def _compare(args: argparse.Namespace, x: torch.Tensor) -> int:
    """Alternates one epoch of MAE, one of MIMIR and one of MIMIR with carried deltas
    (``mimir-pretrain-carry``), ``args.compare`` times; reports medians."""
    runs = {}
    for method in (*METHODS, CARRY):
        torch.manual_seed(args.seed)
        runs[method] = (MaskedAutoencoder(dim=args.dim, depth=args.depth, heads=args.heads,
                                          patch_size=args.patch_size), [], [], [])
    attack = dict(eps=args.eps, steps=args.steps, step_size=args.step_size, lam=args.lam)
    settings = {"mimir-pretrain": attack, CARRY: {**attack, "steps": 1, "perturbation": "carry"},
                "mae-pretrain": dict(eps=0.0, steps=0, step_size=0.0, lam=0.0)}
    for rep in range(args.compare):
        for method, (model, wall, cpu, pgd) in runs.items():
            r = pretrain(model, make_loader(x, args.batch_size, args.seed + rep, indexed=method == CARRY), epochs=1,
                         sigma=args.sigma, estimator=args.estimator,
                         lr=args.lr or scaled_lr(args.blr, args.batch_size), seed=args.seed + rep, progress=False,
                         device=args.device, **settings[method])
            wall.append(r.seconds[0])
            cpu.append(r.cpu_seconds[0])
            pgd.append(r.pgd_seconds[0])
    med = {m: (statistics.median(w), statistics.median(c)) for m, (_, w, c, _) in runs.items()}
    mimir_wall, mimir_pgd = runs["mimir-pretrain"][1], runs["mimir-pretrain"][3]
    carry_wall, carry_update = runs[CARRY][1], runs[CARRY][3]
    report = {
        "config": dict(n=args.n, batch_size=args.batch_size, dim=args.dim, depth=args.depth, heads=args.heads,
                       threads=torch.get_num_threads(), repeats=args.compare, **attack, sigma=args.sigma,
                       estimator=args.estimator, device=args.device, patch_size=args.patch_size,
                       decoder=runs["mae-pretrain"][0].config["decoder_dim"],
                       decoder_depth=runs["mae-pretrain"][0].config["decoder_depth"]),
        "wall_seconds": {m: w for m, (_, w, _, _) in runs.items()},
        "cpu_seconds": {m: c for m, (_, _, c, _) in runs.items()},
        "mimir_pgd_seconds": mimir_pgd,
        "mimir_pgd_share_of_epoch": statistics.median(p / w for p, w in zip(mimir_pgd, mimir_wall)),
        "carry_update_share_of_epoch": statistics.median(p / w for p, w in zip(carry_update, carry_wall)),
        "median_wall_seconds_per_epoch": {m: v[0] for m, v in med.items()},
        "median_cpu_seconds_per_epoch": {m: v[1] for m, v in med.items()},
        "mimir_over_mae_wall": med["mimir-pretrain"][0] / med["mae-pretrain"][0],
        "mimir_over_mae_cpu": med["mimir-pretrain"][1] / med["mae-pretrain"][1],
        "carry_over_mae_wall": med[CARRY][0] / med["mae-pretrain"][0],
        "carry_over_mae_cpu": med[CARRY][1] / med["mae-pretrain"][1],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
