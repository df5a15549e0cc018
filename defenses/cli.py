"""`robustgate fit`: fit a defense offline, calibrate it, and record it in a bundle.

    robustgate fit --bundle DIR --defense KIND [--name NAME] [--target-fpr 0.01]
                   [--params key=value ...] [--n-train N] [--seed S] [--dataset D --data-dir P]
                   [--no-progress]

Steps: load the bundle (every sha256 verified) and its dataset splits conformed to the bundle's
input shape (robustgate.models.data.bundle_splits) -- train (fitting), validation (calibration,
held out of the training images used here) and test (the reported test FPR); build the defense
``KIND`` from the registry with ``--params`` (values parsed as YAML: ``criterion=l1``,
``eps=[0.05,0.1]``); ``fit`` it on the train split with the bundle's torch twin as classifier
(None when the bundle has no twin: the defenses that query the backbone say so); ``save`` its
artifacts under ``DIR/defenses/NAME/``; for detectors, score the clean validation split and set
the threshold at the target false-positive rate (defenses.calibration), measure the FPR on the
clean test split; write the DefenseSpec (kind, artifacts with sha256, params, threshold,
calibration record) into ``DIR/bundle.yaml`` and reload the bundle to verify it. Generic over
kinds: purifiers (``--defense diffusion``, ``reformer``) fit through it too, without calibration.
Progress (tqdm, stderr): the fitting loops (autoencoder and UNet epochs or steps with their loss,
SafetyNet's attacks) and the scoring passes; ``--no-progress`` turns the bars off.

Data: the trainer's splits when the dataset is the bundle recipe's: validation = the images of the
official training set chosen by the recipe's split seed and never trained on (neither by the
backbone nor here), test = the official test set; another ``--dataset`` is split with its own
seed. ``--n-train``/``--n-val``/``--n-test`` take seeded random subsets of each split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from robustgate.defenses import calibration
from robustgate.defenses.base import Detector, FitData, build, check_features_output, registry

EPILOG = """\
the shipped bundles/default was fitted with (its bundle.yaml records each one's params):
  robustgate fit --bundle bundles/default --defense magnet --name magnet_l1 --n-train 50000 \\
      --params criterion=l1 arch=III width=16 epochs=40 lr=0.002
  robustgate fit --bundle bundles/default --defense safetynet --name safetynet
  robustgate fit --bundle bundles/default --defense diffusion --name diffusion
  robustgate fit --bundle bundles/default --defense stateful --name stateful
the k-NN method of the stateful stage trains its similarity encoder (a small CNN; minutes on a CPU):
  robustgate fit --bundle B --defense stateful --name stateful --params method=knn k=4
each kind's parameters and defaults: its class docstring (defenses/detect, defenses/purify).
The stage that serves a fitted defense names the same --name (deploy/default.yaml, docs/OPERATIONS.md);
what each detector and purifier buys against adaptive attacks: docs/EVALUATION.md. SafetyNet's fit
needs scikit-learn's ONNX export and torchattacks (the `fit` extra, docs/OPERATIONS.md "Installing")."""




def add_arguments(parser: argparse.ArgumentParser) -> None:
    from robustgate.models.data import add_data_arguments

    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (bundle.yaml)")
    parser.add_argument("--defense", required=True, metavar="KIND",
                        help="defense kind from the registry: " + ", ".join(sorted(registry())))
    parser.add_argument("--name", help="name of the fitted defense in the bundle (= the pipeline stage name); "
                                       "default: the KIND")
    parser.add_argument("--target-fpr", type=float, default=None,
                        help="clean false-positive rate of detectors (default: 0.01); for kind stateful the benign "
                             "per-query rate shown with 95%% confidence (default: 0.005, defenses/stateful/calibration.py)")
    parser.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="constructor arguments (YAML values); unset ones keep the kind's defaults")
    parser.add_argument("--n-train", type=int, default=None, help="training images used for fitting (default: the "
                                                                  "whole train split, 55,000 for Fashion-MNIST)")
    parser.add_argument("--n-val", type=int, default=None, help="validation images for calibration (default: the whole "
                                                                "validation split, 5,000 for Fashion-MNIST)")
    parser.add_argument("--n-test", type=int, default=None, help="test images for the reported FPR (default: the whole "
                                                                 "test split, 10,000 for Fashion-MNIST)")
    parser.add_argument("--seed", type=int, default=0, help="subset selection seed")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="train/validation split seed (default: the bundle recipe's `seed` for its own dataset, "
                             "so that validation holds no image the backbone trained on; else 0)")
    parser.add_argument("--batch-size", type=int, default=500, help="scoring batch size")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                        help="where the defenses that train a network (magnet, reformer, diffusion, stateful "
                             "method knn) train it; auto = cuda when torch sees one, as robustgate train. "
                             "Saving and calibration run on the CPU")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (tqdm on stderr) over fitting and scoring")
    add_data_arguments(parser)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after the help texts (ArgumentDefaultsHelpFormatter) except where they say
    nothing -- required arguments, switches, None defaults whose help text says what None means --
    or the help already names the default; the epilog's command lines kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action.default, bool) or "default" in text):
            return text
        return super()._get_help_string(action)


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
def _subset(sp, which: str, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` items of split ``which`` chosen by ``seed`` (all of them for None), conformed to the
    splits' shape: only the items taken are conformed (``Splits.take``)."""
    size = sp.size(which)
    if n is None or n >= size:
        return sp.split(which)  # the whole split (Splits refuses one too large to conform at once)
    if n < 1:
        raise ValueError(f"subset size must be positive, got {n}")
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
    return sp.take(which, index=idx)


def subsample(sp, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
              seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``robustgate.models.data.Splits`` -> ``{"train", "val", "test"}`` -> ``(x [N, C, H, W] float32
    in [0, 1], y [N])``, each a seeded random subset of at most ``n_*`` items (None: all)."""
    return {
        "train": _subset(sp, "train", n_train, seed),
        "val": _subset(sp, "val", n_val, seed + 1),
        "test": _subset(sp, "test", n_test, seed + 2),
    }


def load_splits(dataset: str = "fashion-mnist", data_dir: Path | None = None, n_train: int | None = None,
                n_val: int | None = None, n_test: int | None = None, split_seed: int = 0,
                seed: int = 0, val_size: int = 5000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's splits of ``dataset`` as stored (robustgate.models.data, ``split_seed`` and
    ``val_size``), subsampled with ``seed`` (:func:`subsample`)."""
    from robustgate.models.data import load_splits as trainer_splits

    sp = trainer_splits(dataset, data_dir=data_dir, val_size=val_size, seed=split_seed)
    return subsample(sp, n_train, n_val, n_test, seed)


# ---- scoring -----------------------------------------------------------------------------------------
def score_batches(detector: Detector, x: torch.Tensor, classifier, batch_size: int = 500,
                  progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Detector scores ``[N]`` of ``x`` ``[N, C, H, W]`` without gradients, in batches (a tqdm bar
    over the images with ``progress``)."""
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad(), tqdm(total=x.shape[0], desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, x.shape[0], batch_size):
            out.append(detector.score(x[i:i + batch_size], classifier).detach().float())
            bar.update(out[-1].shape[0])
    return torch.cat(out) if out else torch.zeros(0)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def fit_defense(bundle_dir: Path, kind: str, *, name: str | None = None, params: dict[str, Any] | None = None,
                target_fpr: float | None = None, splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                batch_size: int = 500, log=print, progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Fits, saves and calibrates ``kind`` into the bundle at ``bundle_dir``; returns the DefenseSpec
    written (as a dict). ``splits`` as :func:`subsample` returns; ``progress``: tqdm bars;
    ``device``: ``cpu`` or ``cuda``, where a network is trained (FitData.device).
    ``target_fpr`` None: 0.01 for detectors, the stateful calibration's own default for ``stateful``."""
    from robustgate.models.bundle import Bundle, DefenseSpec, artifact
    from robustgate.models.twin import TorchClassifier, has_twin, load_backbone

    name = name or kind
    bundle = Bundle.load(bundle_dir)  # verifies every sha256
    if kind not in registry():
        raise ValueError(f"unknown defense kind {kind!r}; known: {', '.join(sorted(registry()))}")
    check_features_output(registry()[kind], bundle, where="fit")
    stateful = kind == "stateful"
    if stateful:  # calibrated on benign streams with private stores (defenses/stateful/calibration.py)
        from robustgate.defenses.stateful.store import store_for

        params = {"value_range": tuple(bundle.input.value_range), **(params or {})}
        params["store"] = store_for(params.get("method", "blacklight"),
                                    {"max_entries": 2, "max_per_client": 1, "max_clients": 1}, params.get("top_k", 20))
    try:
        defense = build(kind, **(params or {}))
    except (TypeError, ValueError) as exc:  # TypeError: a key the defense does not take
        raise ValueError(f"--params: cannot build defense {kind!r}: {exc}") from exc
    # the defenses that query the backbone (SafetyNet, MagNet's jsd) refuse None with their own message
    classifier = TorchClassifier(load_backbone(bundle)) if has_twin(bundle) else None
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    if tuple(tx.shape[1:]) != tuple(bundle.input.shape):
        raise ValueError(f"data items have shape {tuple(tx.shape[1:])}, the bundle expects {tuple(bundle.input.shape)}")
    data = FitData(tx, ty, vx, vy, value_range=tuple(bundle.input.value_range), progress=progress, device=device)

    t0 = time.perf_counter()
    log(f"fitting {kind} as {name!r} on {tx.shape[0]} training images ({device}) ...")
    defense.fit(data, classifier)
    fit_seconds = time.perf_counter() - t0
    rel_dir = Path("defenses") / name
    written = defense.save(bundle.root / rel_dir)
    files = {role: artifact(bundle.root, str(rel_dir / rel)) for role, rel in written.items()}

    threshold, record = None, None
    if stateful:
        from robustgate.defenses.stateful.calibration import benign_streams, calibrate_stateful

        g = torch.Generator().manual_seed(0)
        # 100 images per benign client: each client's images in random order, 10% exact retries, 10%
        # near-duplicates (crop, brightness, JPEG): one each, or for the k-NN method the k - 1 in a row
        # it promises to leave unflagged (defenses/stateful/knn.py). The k-NN method also calibrates on
        # a second kind of client, the hardest it promises to serve: every image followed by its k - 1
        # near-copies, each client at least as long as the window its neighbours are sought in (100
        # images, 400 queries at k = 4); the threshold is the larger of the two kinds'
        # (defenses/stateful/calibration.py calibrate_stateful).
        if getattr(defense, "method", None) == "knn":
            copies = max(1, defense.k - 1)
            per_client = max(100, -(-(defense.window or 0) // (copies + 1)))  # images per near-copy client

            def streams(x: torch.Tensor) -> dict:
                return {"mixed": benign_streams(x, max(1, x.shape[0] // 100), g, near_copies=copies),
                        "near_copies": benign_streams(x, max(1, x.shape[0] // per_client), g, retry_rate=0.0,
                                                      near_rate=1.0, near_copies=copies)}
        else:
            def streams(x: torch.Tensor) -> list:
                return benign_streams(x, max(1, x.shape[0] // 100), g)
        val_streams, test_streams = streams(vx), streams(sx)
        record = calibrate_stateful(defense, val_streams, test_streams,
                                    **({} if target_fpr is None else {"target_fpr": target_fpr}))
        threshold = record["threshold"]
        log(f"calibrated {name} on benign streams: target FPR {record['target_fpr']:.4f} with confidence "
            f"{record['confidence']:g} (upper bound {record['val_fpr_upper']:.4f})  threshold {threshold:.6g}  "
            f"val FPR {record['val_fpr']:.4f} (n={record['n_val']}, {record['keys']} keys)  "
            f"test FPR {record['test_fpr']:.4f} (n={record['n_test']})")
        for stream_kind, k in record.get("kinds", {}).items():
            log(f"  {stream_kind} streams: own threshold {k['threshold']}  val FPR {k['val_fpr']:.4f} "
                f"(n={k['n_val']})  test FPR {k['test_fpr']:.4f} (n={k['n_test']})")
        if record["val_fpr_upper"] > record["target_fpr"]:
            log(f"warning: {record['n_val']} validation queries cannot show FPR <= {record['target_fpr']:g} with "
                f"confidence {record['confidence']:g}; threshold set to the largest validation score (use more --n-val)")
    elif isinstance(defense, Detector):
        target_fpr = 0.01 if target_fpr is None else target_fpr
        val_scores = score_batches(defense, vx, classifier, batch_size, progress, f"{name}: scoring validation")
        test_scores = score_batches(defense, sx, classifier, batch_size, progress, f"{name}: scoring test")
        record = calibration.calibrate(val_scores, test_scores, target_fpr)
        threshold = record["threshold"]
        log(f"calibrated {name}: target FPR {target_fpr:.4f}  threshold {threshold:.6g}  "
            f"val FPR {record['val_fpr']:.4f} (n={record['n_val']})  test FPR {record['test_fpr']:.4f} (n={record['n_test']})")
        log("validation score quantiles: " + json.dumps({k: round(v, 6) for k, v in record["quantiles"].items()}))
    fit_info = {"fit_seconds": round(fit_seconds, 2), "n_train": int(tx.shape[0]), "device": device}
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
    from robustgate.models.bundle import Bundle
    from robustgate.models.data import bundle_splits

    try:
        from robustgate.defenses.assemble import resolve_device

        device = resolve_device(args.device)
        params = parse_params(args.params)
        # conformed to the bundle's input shape; the recipe's dataset, validation size and split seed
        # (the trainer's, models/train.py) unless told otherwise
        sp = bundle_splits(Bundle.load(args.bundle), args.dataset, args.data_dir, seed=args.split_seed)
        splits = subsample(sp, args.n_train, args.n_val, args.n_test, args.seed)
        fit_defense(args.bundle, args.defense, name=args.name, params=params, target_fpr=args.target_fpr,
                    splits=splits, batch_size=args.batch_size, progress=args.progress, device=device)
    except (ValueError, OSError) as exc:  # BundleError, a missing dataset (DatasetMissing) and bad params included
        print(f"robustgate fit: error: {exc}", file=sys.stderr)
        return 2
    return 0
