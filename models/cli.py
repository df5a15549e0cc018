"""``robustgate train``: train a (robust) backbone and write a bundle.

Exposes ``add_arguments(parser)`` and ``run(args) -> int`` for ``robustgate.proxy.cli``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EPILOG = """\
examples:
  # the shipped bundles/default (docs/TRAINING.md, "The default bundle": why this recipe, its numbers;
  # there it runs as 2 DDP processes under torchrun, same flags)
  robustgate train --dataset fashion-mnist --arch cnn --arch-kwargs '{"width": 16, "hidden": 256}' \\
    --method fast-at --eps 0.1 --epochs 15 --batch-size 128 --optimizer adam --lr 0.002 --weight-decay 0 \\
    --schedule onecycle --seed 0 --name default --out bundles/mine

  # TRADES instead (a --steps inner attack per batch: several times the cost of fast-at on a CPU)
  robustgate train --dataset fashion-mnist --arch cnn --method trades --eps 0.1 --epochs 10 --out bundles/trades

  # a quick, non-robust baseline
  robustgate train --method standard --epochs 2 --out bundles/standard

  # a base classifier for randomized smoothing (Gaussian noise augmentation, sigma 0.25)
  robustgate train --method standard --noise-sigma 0.25 --epochs 5 --out bundles/smoothing

  # interrupted? the same command with --resume continues from the last finished epoch
  robustgate train ... --resume

  # two processes with DistributedDataParallel (gloo on CPU); --batch-size stays the global batch
  torchrun --nproc_per_node=2 -m robustgate.proxy.cli train --method fast-at --out bundles/ddp

methods: standard (clean cross-entropy), fast-at (FGSM with random start, Wong et al. 2020),
pgd-at (Madry et al. 2018), trades (Zhang et al. 2019, --beta), mart (Wang et al. 2020, --beta).
All attacks are l-inf in pixel space [0, 1]; the model normalizes its input itself.

MIMIR (docs/MIMIR.md): pre-train a vit_tiny encoder as a masked autoencoder, adversarially with
the mutual-information penalty (mimir-pretrain) or clean (mae-pretrain, the baseline), then
fine-tune it adversarially:
  robustgate train --arch vit_tiny --method mimir-pretrain --eps 0.1 --epochs 20 --out runs/mimir
  robustgate train --arch vit_tiny --method pgd-at --init runs/mimir/pretrained.safetensors --eps 0.1 --out bundles/mimir

The bundle's bundle.yaml records the recipe, the epoch chosen by validation PGD accuracy, and
clean / PGD-20 test accuracy with the threat model they were measured under. Next steps:
`robustgate fit` (a detector into the bundle), `robustgate serve --bundle DIR` (docs/OPERATIONS.md).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from robustgate.models.archs import arch_names
    from robustgate.models.data import DATASETS
    from robustgate.models.losses import METHODS
    from robustgate.models.train import OPTIMIZERS, SCHEDULES, SELECT

    parser.epilog = EPILOG  # formatter: robustgate.proxy.cli.HelpFormatter (defaults shown, epilog as written)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    g.add_argument("--name", "--model-name", dest="name",
                   help="bundle name, which `serve` answers to as the model name (default: the --out folder name)")
    g.add_argument("--checkpoint-dir", help="where epoch checkpoints go (default: <out>.ckpt)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    g.add_argument("--no-features", dest="features", action="store_false",
                   help="export only the 'logits' output (default also exports 'features' for SafetyNet)")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist", choices=DATASETS,
                   help="fashion-mnist reads /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)")
    g.add_argument("--data-dir", help="dataset root (mnist/cifar10: torchvision format; imagefolder: train/ and test/)")
    g.add_argument("--val-size", type=int, default=5000, help="items held out of train for model selection (default 5000)")
    g.add_argument("--train-items", type=int, help="train on the first N training items only (quick experiments)")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="cnn", choices=arch_names(), help="architecture (default: cnn, sized for the CPU)")
    g.add_argument("--arch-kwargs", type=json.loads, default={},
                   help='JSON keyword arguments of the architecture, e.g. \'{"width": 16, "hidden": 128}\'')

    g = parser.add_argument_group("method")
    g.add_argument("--method", default="standard", choices=[*METHODS, *PRETRAIN_METHODS],
                   help="training objective (default: standard); mimir-pretrain / mae-pretrain pre-train a vit_tiny "
                        "encoder and write <out>/pretrained.safetensors instead of a bundle")
    g.add_argument("--init", help="pre-trained MAE/MIMIR checkpoint initializing the vit_tiny encoder (fine-tuning)")
    g.add_argument("--mi-lambda", type=float, default=1e-5, help="mimir-pretrain: weight of the HSIC penalty (default 1e-5)")
    g.add_argument("--mi-sigma", default="median",
                   help="mimir-pretrain: HSIC kernel width, or 'median' for the median heuristic (default; the "
                        "reference's 5 makes the kernel near constant on [0, 1] pixels, docs/MIMIR.md)")
    g.add_argument("--blr", type=float, default=1.5e-4,
                   help="mimir-/mae-pretrain: base lr, lr = blr * batch / 256 (default 1.5e-4, the reference's); "
                        "--lr applies to fine-tuning only")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="mimir-/mae-pretrain: linear lr warm-up before the cosine (default 5%% of --epochs)")
    g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="mimir-/mae-pretrain: reconstruct raw pixels instead of per-patch normalized ones")
    g.add_argument("--mi-estimator", default="nhsic_cca", choices=["nhsic_cca", "hsic"],
                   help="mimir-pretrain: mutual-information estimator (default nhsic_cca, as the reference code)")
    g.add_argument("--mi-perturbation", default="pgd", choices=["pgd", "carry"],
                   help="mimir-pretrain: one PGD step per batch (pgd, the reference's) or each image's delta carried "
                        "across epochs and moved by the training step's own input gradient (carry: no extra pass, "
                        "docs/MIMIR.md)")
    g.add_argument("--eps", type=float, default=0.1, help="l-inf radius in [0, 1] pixel units (default 0.1)")
    g.add_argument("--alpha", type=float, help="attack step size (default 1.25*eps for fast-at, 2.5*eps/steps otherwise)")
    g.add_argument("--steps", type=int, default=10, help="inner attack steps for pgd-at / trades / mart (default 10)")
    g.add_argument("--restarts", type=int, default=1, help="inner PGD random restarts (default 1)")
    g.add_argument("--beta", type=float, default=6.0, help="robust-loss weight of trades / mart (default 6)")
    g.add_argument("--noise-sigma", type=float, default=0.0,
                   help="add N(0, sigma^2) noise to training inputs (randomized smoothing backbones; default 0)")
    g.add_argument("--eps-ramp-epochs", type=float, default=0.0, help="grow eps linearly over this many epochs (default 0)")

    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=10, help="training epochs")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="optimizer (the shipped recipe: adam)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (the shipped recipe: 0)")
    g.add_argument("--schedule", default="onecycle", choices=SCHEDULES, help="learning-rate schedule (default onecycle)")

    g = parser.add_argument_group("selection and evaluation")
    g.add_argument("--select", default=None, choices=SELECT,
                   help="keep the epoch with the best validation PGD (robust), clean accuracy, or the last "
                        "(default: clean for --method standard, robust for the adversarial methods)")
    g.add_argument("--val-items", type=int, default=1000, help="validation items evaluated each epoch (default 1000)")
    g.add_argument("--val-steps", type=int, default=10, help="validation PGD steps (default 10)")
    g.add_argument("--test-items", type=int, help="test items for the final measurement (default: all)")
    g.add_argument("--test-steps", type=int, default=20, help="final PGD steps (default 20)")
    g.add_argument("--test-restarts", type=int, default=1, help="final PGD random restarts")

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, the initialization, data order and attacks")
    g.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    g.add_argument("--stop-after", type=int, help="stop after this many epochs in total, leaving a checkpoint")
    g.add_argument("--max-steps-per-epoch", type=int, help="cap the steps per epoch (smoke tests)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")


PRETRAIN_METHODS = ("mimir-pretrain", "mae-pretrain")


def pretrain_encoder(cfg, args: argparse.Namespace) -> dict:
    """MAE / MIMIR pre-training of the encoder of the vit_tiny that ``cfg`` describes."""
    from pathlib import Path

    import torch

    from robustgate.models.data import load_splits
    from robustgate.models.mae import MaskedAutoencoder
    from robustgate.models.mimir import make_loader, parse_sigma, pretrain, scaled_lr
    from robustgate.models.train import _arch_kwargs, _channel_stats

    if cfg.arch != "vit_tiny":
        raise ValueError(f"--method {args.method} pre-trains a vit_tiny encoder; got --arch {cfg.arch}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_splits(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, seed=cfg.seed)
    train_x = splits.train_x[: cfg.train_items] if cfg.train_items is not None else splits.train_x
    mean, std = _channel_stats(splits.train_x)
    kwargs = _arch_kwargs(cfg, splits.input_shape, len(splits.classes), mean, std)
    kwargs.pop("num_classes")
    for key in ("pool", "drop_path"):  # classifier-only options: fine-tuning sets them, not the MAE
        kwargs.pop(key, None)
    kwargs.setdefault("pos_embed", "sincos")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as `robustgate train` does
    torch.manual_seed(cfg.seed)
    mae = MaskedAutoencoder(**kwargs, norm_pix_loss=args.norm_pix_loss)  # encoder = the classifier's (docs/MIMIR.md)
    mimir = args.method == "mimir-pretrain"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = pretrain(
        mae, make_loader(train_x, cfg.batch_size, cfg.seed, indexed=mimir and args.mi_perturbation == "carry"),
        epochs=cfg.epochs, perturbation=args.mi_perturbation if mimir else "pgd",
        eps=cfg.eps if mimir else 0.0, steps=1 if mimir else 0,
        step_size=(cfg.alpha or 1.25 * cfg.eps) if mimir else 0.0,
        lam=args.mi_lambda if mimir else 0.0, sigma=parse_sigma(args.mi_sigma), estimator=args.mi_estimator,
        lr=scaled_lr(args.blr, cfg.batch_size), warmup_epochs=args.warmup_epochs, seed=cfg.seed, device=device,
        progress=cfg.progress, checkpoint=out / "pretrained.safetensors",
    )
    return {"pretrained": str(out / "pretrained.safetensors"), "method": args.method, "device": str(device),
            "perturbation": args.mi_perturbation if mimir else None,
            "classifier_arch_kwargs": {"pos_embed": kwargs["pos_embed"]},
            "loss_per_epoch": result.losses, "rec_loss_per_epoch": result.rec_losses,
            "mi_share_per_epoch": result.mi_share, "pgd_seconds_per_epoch": result.pgd_seconds,
            "seconds_per_epoch": result.seconds, "images_per_s": result.images_per_s}


def run(args: argparse.Namespace) -> int:
    from robustgate.models.data import DatasetMissing
    from robustgate.models.train import TrainConfig, train

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("robustgate").setLevel(logging.INFO)
    keys = TrainConfig.__dataclass_fields__
    pretraining = args.method in PRETRAIN_METHODS
    try:
        values = {k: v for k, v in vars(args).items() if k in keys}
        if pretraining:
            values["method"] = "standard"  # TrainConfig validates the shared options; the objective is MAE/MIMIR
        cfg = TrainConfig(**values)
        if pretraining:
            print(json.dumps(pretrain_encoder(cfg, args), indent=1))
            return 0
        summary = train(cfg)
    except (ValueError, DatasetMissing) as exc:
        print(f"robustgate train: error: {exc}", file=sys.stderr)
        return 2
    if "metrics" in summary:
        m = {k: v for k, v in summary["metrics"].items() if k != "history"}
        print(json.dumps({"bundle": summary["bundle"], **m}, indent=1))
    return 0
