"""`robustgate fit`: fit a defense offline, calibrate it, and record it in a bundle.

    robustgate fit --bundle DIR --defense KIND [--name NAME] [--target-fpr 0.01]
                   [--params key=value ...] [--n-train N] [--seed S]

Steps: load the bundle (every sha256 verified) and its dataset splits -- train (fitting),
validation (calibration, held out of the training images used here) and test (the reported
test FPR); build the defense ``KIND`` from the registry with ``--params`` (values parsed as
YAML: ``criterion=l1``, ``eps=[0.05,0.1]``); ``fit`` it on the train split with the bundle's torch
twin as classifier; ``save`` its artifacts under ``DIR/defenses/NAME/``; for detectors, score
the clean validation split and set the threshold at the target false-positive rate
(defenses.calibration), measure the FPR on the clean test split; write the DefenseSpec (kind,
artifacts with sha256, params, threshold, calibration record) into ``DIR/bundle.yaml`` and
reload the bundle to verify it. Generic over kinds: purifiers (``--defense diffusion``,
``reformer``) fit through it too, without calibration.

Data: the trainer's splits (robustgate.models.data.load_splits): validation = 5,000 images of
the official training set chosen by the split seed and never trained on (neither by the
backbone nor here), test = the official test set. The split seed and validation size must be the
trainer's (read from the bundle recipe's ``seed`` and ``val_size``, else 0 and 5,000). ``--n-train``/``--n-val``/``--n-test``
take seeded random subsets of each split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from robustgate.defenses import calibration
from robustgate.defenses.base import Detector, FitData, build, registry

FIT_EPILOG = """\
example (the shipped detector of deploy/default.yaml, fitted into bundles/default):
  robustgate fit --bundle bundles/default --defense magnet --name magnet_l1 \\
    --params criterion=l1 arch=III width=16 activation=relu epochs=40 lr=0.002 --n-train 50000

The stage that serves it names the same --name (deploy/default.yaml, docs/OPERATIONS.md); what each
detector and purifier buys against adaptive attacks: docs/EVALUATION.md. SafetyNet's fit needs
scikit-learn's ONNX export and torchattacks (the `fit` extra, docs/OPERATIONS.md "Installing").
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = FIT_EPILOG  # formatter: robustgate.proxy.cli.HelpFormatter (defaults shown)
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (bundle.yaml)")
    parser.add_argument("--defense", required=True, help="defense kind from the registry (magnet, safetynet, reformer, ...)")
    parser.add_argument("--name", help="name of the fitted defense in the bundle (= the pipeline stage name); default: KIND")
    parser.add_argument("--target-fpr", type=float, default=0.01, help="clean false-positive rate of detectors (default 0.01)")
    parser.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE", help="constructor arguments (YAML values)")
    parser.add_argument("--n-train", type=int, default=None, help="training images used for fitting (default: all 55,000)")
    parser.add_argument("--n-val", type=int, default=None, help="validation images for calibration (default: all 5,000)")
    parser.add_argument("--n-test", type=int, default=None, help="test images for the reported FPR (default: all 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="subset selection seed")
    parser.add_argument("--dataset", default=None, help="dataset name (default: the bundle recipe's `dataset`, else fashion-mnist)")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset files (default: the trainer's default location)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="train/validation split seed; must be the trainer's (default: the bundle recipe's `seed`, else 0)")
    parser.add_argument("--batch-size", type=int, default=500, help="scoring batch size")


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=[0.1, 0.2]", "c=l1"]`` -> ``{"a": 1, "b": [0.1, 0.2], "c": "l1"}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--params expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


# ---- data --------------------------------------------------------------------------------------------
def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= x.shape[0]:
        return x, y
    if n < 1:
        raise ValueError(f"subset size must be positive, got {n}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_splits(dataset: str = "fashion-mnist", data_dir: Path | None = None, n_train: int | None = None,
                n_val: int | None = None, n_test: int | None = None, split_seed: int = 0,
                seed: int = 0, val_size: int = 5000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's splits (robustgate.models.data, ``split_seed`` and ``val_size``), subsampled
    with ``seed``: ``{"train", "val", "test"}`` -> ``(x [N, C, H, W] float32 in [0, 1], y [N])``."""
    from robustgate.models.data import load_splits as trainer_splits

    sp = trainer_splits(dataset, data_dir=data_dir, val_size=val_size, seed=split_seed)
    return {
        "train": _subset(sp.train_x, sp.train_y, n_train, seed),
        "val": _subset(sp.val_x, sp.val_y, n_val, seed + 1),
        "test": _subset(sp.test_x, sp.test_y, n_test, seed + 2),
    }


# ---- scoring -----------------------------------------------------------------------------------------
def score_batches(detector: Detector, x: torch.Tensor, classifier, batch_size: int = 500) -> torch.Tensor:
    """Detector scores ``[N]`` of ``x`` ``[N, C, H, W]`` without gradients, in batches."""
    with torch.no_grad():
        return torch.cat([detector.score(x[i:i + batch_size], classifier).detach().float()
                          for i in range(0, x.shape[0], batch_size)])


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def fit_defense(bundle_dir: Path, kind: str, *, name: str | None = None, params: dict[str, Any] | None = None,
                target_fpr: float = 0.01, splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                batch_size: int = 500, log=print) -> dict[str, Any]:
    """Fits, saves and calibrates ``kind`` into the bundle at ``bundle_dir``; returns the DefenseSpec
    written (as a dict). ``splits`` as :func:`load_splits` returns."""
    from robustgate.models.bundle import Bundle, DefenseSpec, artifact
    from robustgate.models.twin import TorchClassifier, load_backbone

    name = name or kind
    bundle = Bundle.load(bundle_dir)  # verifies every sha256
    if kind not in registry():
        raise ValueError(f"unknown defense kind {kind!r}; known: {', '.join(sorted(registry()))}")
    defense = build(kind, **(params or {}))
    classifier = TorchClassifier(load_backbone(bundle))
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    if tuple(tx.shape[1:]) != tuple(bundle.input.shape):
        raise ValueError(f"data items have shape {tuple(tx.shape[1:])}, the bundle expects {tuple(bundle.input.shape)}")
    data = FitData(tx, ty, vx, vy, value_range=tuple(bundle.input.value_range))

    t0 = time.perf_counter()
    log(f"fitting {kind} as {name!r} on {tx.shape[0]} training images ...")
    defense.fit(data, classifier)
    fit_seconds = time.perf_counter() - t0
    rel_dir = Path("defenses") / name
    written = defense.save(bundle.root / rel_dir)
    files = {role: artifact(bundle.root, str(rel_dir / rel)) for role, rel in written.items()}

    threshold, record = None, None
    if isinstance(defense, Detector):
        val_scores = score_batches(defense, vx, classifier, batch_size)
        test_scores = score_batches(defense, sx, classifier, batch_size)
        record = calibration.calibrate(val_scores, test_scores, target_fpr)
        threshold = record["threshold"]
        log(f"calibrated {name}: target FPR {target_fpr:.4f}  threshold {threshold:.6g}  "
            f"val FPR {record['val_fpr']:.4f} (n={record['n_val']})  test FPR {record['test_fpr']:.4f} (n={record['n_test']})")
        log("validation score quantiles: " + json.dumps({k: round(v, 6) for k, v in record["quantiles"].items()}))
    fit_info = {"fit_seconds": round(fit_seconds, 2), "n_train": int(tx.shape[0])}
    report = getattr(defense, "fit_report", None) or {}
    history = getattr(defense, "history", None)
    if history:
        fit_info["final_train_loss"] = float(history[-1])
    if report:
        fit_info["report"] = report
    config = {k: v for k, v in defense.config().items() if k != "threshold"}
    spec = DefenseSpec(kind=kind, files=files, params=_plain(config), threshold=threshold,
                       calibration=_plain({**record, "fit": fit_info}) if record else _plain({"fit": fit_info}))
    bundle.with_defense(name, spec).save()
    Bundle.load(bundle.root)  # re-verify what was written
    log(f"wrote defense {name!r} ({kind}) into {bundle.root / 'bundle.yaml'}")
    return spec.model_dump(mode="json")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    params = parse_params(args.params)
    from robustgate.models.bundle import Bundle

    recipe = Bundle.load(args.bundle).spec.backbone.recipe
    dataset = args.dataset or recipe.get("dataset", "fashion-mnist")
    # the trainer splits train/validation with its recipe's seed and val_size (models/train.py)
    split_seed = args.split_seed if args.split_seed is not None else int(recipe.get("seed", 0))
    data_dir = args.data_dir if args.data_dir is not None else recipe.get("data_dir")
    splits = load_splits(dataset, data_dir, args.n_train, args.n_val, args.n_test, split_seed, args.seed,
                         val_size=int(recipe.get("val_size", 5000)))
    fit_defense(args.bundle, args.defense, name=args.name, params=params, target_fpr=args.target_fpr,
                splits=splits, batch_size=args.batch_size)
    return 0
