"""The training loop: methods, LR schedule, validation-PGD model selection, checkpoints, DDP.

``train(TrainConfig(...)) -> dict`` trains a backbone with one of ``losses.METHODS``, keeps the
epoch with the best validation PGD accuracy (robust overfitting is real, Rice et al. 2020: the
last epoch is often not the most robust), measures clean and PGD accuracy of that model on the
test set, and writes a bundle (``export.write_bundle``) whose ``backbone.metrics`` holds the
numbers *and* the threat model they were measured under.

Reproducibility: every epoch draws its data order and attack noise from generators seeded by
``(seed, epoch, rank)`` alone, so a run resumed from an epoch checkpoint (``resume=True``)
produces exactly the weights of an uninterrupted run (on the same machine and thread count).
Checkpoints are ``<checkpoint_dir>/last.safetensors`` (model + optimizer tensors),
``last.json`` (epoch, history, best, optimizer hyper-parameters) and ``best.safetensors``; no
pickle anywhere.

Scale-out: under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA). ``batch_size`` stays the *global*
batch (each rank takes ``batch_size // N`` items of a shared seeded permutation); rank 0
validates, checkpoints and writes the bundle; at the end every rank's weights are compared
(digest all-gather) and a mismatch raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from robustgate.models.archs import arch_class, build_arch
from robustgate.models.data import DATASETS, load_splits
from robustgate.models.inner import robust_accuracy
from robustgate.models.losses import METHODS, passes_per_item

log = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine", "multistep", "constant")
OPTIMIZERS = ("sgd", "adam")
SELECT = ("robust", "clean", "last")


@dataclass
class TrainConfig:
    out: str
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int = 5000
    train_items: int | None = None  # use only the first N training items (smoke tests)
    arch: str = "cnn"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "standard"
    eps: float = 0.1
    alpha: float | None = None  # default: 1.25 eps (fast-at), 2.5 eps / steps (others)
    steps: int = 10
    restarts: int = 1
    beta: float = 6.0
    noise_sigma: float = 0.0
    eps_ramp_epochs: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    val_items: int = 1000
    val_steps: int = 10
    select: str | None = None  # None: "clean" for method standard (its PGD accuracy is ~0), else "robust"
    test_items: int | None = None  # None: the whole test set
    test_steps: int = 20
    test_restarts: int = 1
    seed: int = 0
    checkpoint_dir: str | None = None  # default: <out>.ckpt
    resume: bool = False
    stop_after: int | None = None  # stop after this many epochs in total (a checkpoint remains)
    max_steps_per_epoch: int | None = None  # smoke tests
    features: bool = True
    name: str | None = None
    threads: int | None = None
    progress: bool = True
    init: str | None = None  # pre-trained MAE/MIMIR checkpoint whose encoder initializes a vit_tiny

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.select is None:
            self.select = "clean" if self.method == "standard" else "robust"
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        for key in ("epochs", "batch_size", "steps", "restarts", "val_steps", "test_steps", "test_restarts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eps", "noise_sigma", "beta", "lr", "weight_decay", "eps_ramp_epochs", "val_items"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.method != "standard" and self.eps <= 0:
            raise ValueError(f"method {self.method} needs eps > 0")
        if self.alpha is None:
            self.alpha = 1.25 * self.eps if self.method == "fast-at" else 2.5 * self.eps / self.steps
        if self.alpha <= 0 and self.method != "standard":
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.init is not None and not Path(self.init).is_file():
            raise ValueError(f"--init {self.init}: no such file (a pretrained.safetensors written by "
                             f"`robustgate train --method mimir-pretrain|mae-pretrain`)")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.epochs:
            raise ValueError(f"stop_after must be in [1, epochs={self.epochs}], got {self.stop_after}")

    # keys that must not change when resuming (everything that shapes the weights)
    def fingerprint(self) -> dict[str, Any]:
        ignore = {"out", "checkpoint_dir", "resume", "stop_after", "name", "threads", "progress",
                  "test_items", "test_steps", "test_restarts", "data_dir"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}


# ---- pure helpers -----------------------------------------------------------------------------
def lr_at(schedule: str, base: float, t: float) -> float:
    """Learning rate at training progress ``t`` in [0, 1].

    onecycle: linear 0 -> base over the first 40%, then -> 0 (Smith 2018; Wong et al. 2020 use it
    for fast-AT); cosine: base * (1 + cos(pi t)) / 2; multistep: x0.1 at 50% and 75% (Madry/Rice);
    constant: base."""
    if schedule == "onecycle":
        return base * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "multistep":
        return base * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
    if schedule == "constant":
        return base
    raise ValueError(f"unknown schedule {schedule!r}")


def eps_at(eps: float, ramp_epochs: float, epoch_progress: float) -> float:
    """Linear epsilon warm-up over the first ``ramp_epochs`` epochs (0: full eps from the start)."""
    return eps if ramp_epochs <= 0 else eps * min(1.0, epoch_progress / ramp_epochs)


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _seed_for(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63 - 1)


def _arch_kwargs(cfg: TrainConfig, input_shape: tuple[int, int, int], num_classes: int, mean, std) -> dict[str, Any]:
    """The dataset decides channels, classes, image size and normalization; --arch-kwargs the rest."""
    params = inspect.signature(arch_class(cfg.arch)).parameters
    kwargs: dict[str, Any] = {"in_channels": input_shape[0], "num_classes": num_classes, "mean": list(mean), "std": list(std)}
    if "image_size" in params:
        kwargs["image_size"] = input_shape[1]
    unknown = set(cfg.arch_kwargs) - set(params)
    if unknown:
        raise ValueError(f"--arch-kwargs {sorted(unknown)} are not parameters of {cfg.arch} ({', '.join(params)})")
    kwargs.update(cfg.arch_kwargs)
    return kwargs


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


# ---- checkpoints --------------------------------------------------------------------------------
def _save_checkpoint(ckpt: Path, module: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for key, val in st.items():
            if not torch.is_tensor(val):
                val = torch.tensor(val)
            tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous()
    meta = {**meta, "optimizer_param_groups": osd["param_groups"]}
    tmp = ckpt / "last.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(ckpt / "last.safetensors")
    tmpj = ckpt / "last.json.tmp"
    tmpj.write_text(json.dumps(meta, indent=1))
    tmpj.replace(ckpt / "last.json")


def _load_checkpoint(ckpt: Path, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    meta = json.loads((ckpt / "last.json").read_text())
    tensors = load_file(str(ckpt / "last.safetensors"))
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    return meta


# ---- distributed --------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


# ---- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Trains, selects, evaluates and writes the bundle; returns a summary (rank 0: with metrics)."""
    rank, world, device = _init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    out = Path(cfg.out)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.with_name(out.name + ".ckpt")

    splits = load_splits(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, seed=cfg.seed)
    train_x, train_y = splits.train_x, splits.train_y
    if cfg.train_items is not None:
        train_x, train_y = train_x[: cfg.train_items], train_y[: cfg.train_items]
    val_x, val_y = splits.val_x[: cfg.val_items].to(device), splits.val_y[: cfg.val_items].to(device)
    mean, std = _channel_stats(splits.train_x)
    arch_kwargs = _arch_kwargs(cfg, splits.input_shape, len(splits.classes), mean, std)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    module = build_arch(cfg.arch, **arch_kwargs).to(device)
    if cfg.init:  # adversarial fine-tuning of a pre-trained encoder (MIMIR, docs/MIMIR.md)
        from robustgate.models.mimir import init_classifier

        kept = init_classifier(module, cfg.init)
        log.info("initialized the encoder from %s; own initialization kept for %s", cfg.init, ", ".join(kept))
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model: nn.Module = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank = cfg.batch_size // world
    steps_per_epoch = len(train_x) // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_x)} training items are fewer than one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    val_alpha = 2.5 * cfg.eps / cfg.val_steps

    start_epoch, history, best = 0, [], {"epoch": None, "metric": -1.0}
    best_state = None
    if cfg.resume and (ckpt / "last.json").is_file():
        meta = _load_checkpoint(ckpt, module, opt)
        changed = {k: (meta["config"].get(k), v) for k, v in cfg.fingerprint().items() if meta["config"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume from {ckpt}: the configuration changed ({changed}; old, new)")
        if meta["world_size"] != world:
            raise ValueError(f"cannot resume from {ckpt}: it was written by {meta['world_size']} processes, now {world}")
        start_epoch, history, best = meta["epoch"], meta["history"], meta["best"]
        if (ckpt / "best.safetensors").is_file():
            best_state = load_file(str(ckpt / "best.safetensors"))
        if rank == 0:
            log.info("resumed from %s after epoch %d", ckpt, start_epoch)
    elif cfg.resume and rank == 0:
        log.info("--resume: no checkpoint in %s, starting from scratch", ckpt)

    end_epoch = cfg.stop_after or cfg.epochs
    train_seconds = 0.0
    train_images = 0
    wall_start = time.time()
    for epoch in range(start_epoch, end_epoch):
        # 1. per-epoch seeded data order (shared by all ranks) and attack noise (per rank)
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(_seed_for(cfg.seed, epoch)))
        attack_gen = torch.Generator(device=device).manual_seed(_seed_for(cfg.seed, epoch, rank + 1))
        torch.manual_seed(_seed_for(cfg.seed, epoch, rank + 7))
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
        t0 = time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs} {cfg.method}",
                   disable=rank != 0 or not cfg.progress, mininterval=1 if sys.stderr.isatty() else 30,
                   file=sys.stderr)
        for step in bar:
            global_step = epoch * steps_per_epoch + step
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg.schedule, cfg.lr, global_step / total_steps)
            idx = perm[step * cfg.batch_size + rank * per_rank: step * cfg.batch_size + (rank + 1) * per_rank]
            xb, yb = train_x[idx].to(device), train_y[idx].to(device)
            step_cfg = cfg
            if cfg.eps_ramp_epochs > 0 and cfg.method != "standard":
                ramp = eps_at(1.0, cfg.eps_ramp_epochs, epoch + (step + 1) / steps_per_epoch)  # in (0, 1]
                step_cfg = SimpleNamespace(**{**dataclasses.asdict(cfg), "eps": cfg.eps * ramp, "alpha": cfg.alpha * ramp})
            loss, logits = METHODS[cfg.method](model, xb, yb, step_cfg, attack_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(yb)
            sums += torch.tensor([loss.item() * n, (logits.argmax(1) == yb).sum().item(), n], dtype=torch.float64)
            if rank == 0 and cfg.progress:
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.4f}", refresh=False)
        bar.close()
        epoch_seconds = time.time() - t0
        if world > 1:
            dist.all_reduce(sums)
        train_seconds += epoch_seconds
        train_images += int(sums[2])

        # 2. validation PGD (rank 0) and model selection
        record = {"epoch": epoch + 1, "train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2]),
                  "seconds": round(epoch_seconds, 2), "images_per_s": round(float(sums[2]) / epoch_seconds, 1)}
        if rank == 0:
            if len(val_x):
                vclean, vrob = robust_accuracy(module, val_x, val_y, cfg.eps, val_alpha, cfg.val_steps,
                                               seed=cfg.seed) if cfg.eps > 0 else robust_accuracy(module, val_x, val_y, 0.0, 1.0, 1)
                record.update(val_clean_acc=vclean, val_pgd_acc=vrob)
                metric = {"robust": vrob, "clean": vclean, "last": float(epoch)}[cfg.select]
            else:
                metric = float(epoch)
            if metric > best["metric"]:
                best = {"epoch": epoch + 1, "metric": metric}
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                ckpt.mkdir(parents=True, exist_ok=True)
                save_file(best_state, str(ckpt / "best.safetensors.tmp"))
                (ckpt / "best.safetensors.tmp").replace(ckpt / "best.safetensors")
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, record)
            print(json.dumps(record), file=sys.stderr, flush=True)
            _save_checkpoint(ckpt, module, opt, {
                "epoch": epoch + 1, "history": history, "best": best, "world_size": world,
                "config": cfg.fingerprint(),
            })
        if world > 1:
            dist.barrier()

    # 3. every rank must hold the same weights (DDP's guarantee, checked)
    digest = state_digest(module)
    if world > 1:
        digests: list[str | None] = [None] * world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks diverged: weight digests {digests}")

    summary: dict[str, Any] = {"rank": rank, "world_size": world, "epochs_done": end_epoch,
                               "weights_digest": digest, "checkpoint_dir": str(ckpt), "history": history}
    if rank == 0 and end_epoch == cfg.epochs:
        summary.update(_finish(cfg, module, best_state, best, history, splits, arch_kwargs, out, device, world,
                               train_images, train_seconds, time.time() - wall_start))
    if world > 1:
        dist.barrier()
    return summary


def _finish(cfg, module, best_state, best, history, splits, arch_kwargs, out, device, world,
            train_images, train_seconds, wall_seconds) -> dict[str, Any]:
    """Loads the selected epoch, measures it on the test set, writes the bundle."""
    from robustgate.models.export import write_bundle  # lazy: export pulls pydantic/onnx, training needs neither
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    test_x, test_y = splits.test_x, splits.test_y
    if cfg.test_items is not None:
        test_x, test_y = test_x[: cfg.test_items], test_y[: cfg.test_items]
    test_alpha = 2.5 * cfg.eps / cfg.test_steps
    t0 = time.time()
    clean, robust = robust_accuracy(module, test_x.to(device), test_y.to(device), cfg.eps, test_alpha,
                                    cfg.test_steps, cfg.test_restarts, seed=cfg.seed, progress=cfg.progress)
    eval_seconds = time.time() - t0
    metrics = {
        "clean_accuracy": round(clean, 4),
        f"pgd{cfg.test_steps}_accuracy": round(robust, 4),
        "threat_model": {
            "norm": "linf", "eps": cfg.eps, "attack": f"PGD-{cfg.test_steps} (robustgate.models.inner.pgd, CE loss)",
            "steps": cfg.test_steps, "step_size": round(test_alpha, 6), "restarts": cfg.test_restarts,
            "random_start": True, "items": len(test_x), "split": "test" if cfg.test_items is None else f"test[:{len(test_x)}]",
            "model": "torch twin, white-box, no defenses; not an adaptive or AutoAttack evaluation",
        },
        "selected_epoch": best["epoch"],
        "selected_by": f"validation {'PGD-' + str(cfg.val_steps) if cfg.select == 'robust' else cfg.select} "
                       f"accuracy on {min(cfg.val_items, len(splits.val_x))} held-out items",
        "history": history,
        "train_images_per_s": round(train_images / train_seconds, 1) if train_seconds else None,
        "train_seconds_this_run": round(train_seconds, 1),
        "wall_seconds_this_run": round(wall_seconds, 1),
        "test_eval_seconds": round(eval_seconds, 1),
        "processes": world,
        "threads_per_process": torch.get_num_threads(),
    }
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("out", "checkpoint_dir", "resume", "stop_after", "progress", "name")}
    recipe["passes_per_item"] = passes_per_item(cfg.method, cfg.steps, cfg.restarts)
    recipe["split"] = splits.info
    write_bundle(out, module, arch=cfg.arch, arch_kwargs=arch_kwargs, classes=splits.classes,
                 input_shape=splits.input_shape, name=cfg.name or out.name, features=cfg.features,
                 recipe=recipe, metrics=metrics, seed=cfg.seed, probe=test_x[:16],
                 extra_provenance={"processes": world, "launcher": "torchrun (DDP)" if world > 1 else "single process"})
    return {"bundle": str(out), "metrics": metrics}
