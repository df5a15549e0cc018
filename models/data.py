"""Datasets as in-memory tensors, with a seeded, fixed train / validation / test split.

``load_splits(name, data_dir=None, val_size=5000, seed=0) -> Splits`` holds ``[N, C, H, W]``
float32 pixels in [0, 1] and int64 labels per split. The validation split is carved out of the
official training set by a seeded permutation and is never trained on: it is for model
selection (robust overfitting, Rice et al. 2020) and for calibrating detector thresholds. The
test split is the official test set. The same seed gives the same split on every machine.

Sources:

- ``fashion-mnist`` (default): Debian's ``dataset-fashion-mnist`` puts the original gzipped IDX
  files in ``/usr/share/datasets/fashion-mnist``. torchvision's ``FashionMNIST`` reads only
  *uncompressed* files under ``root/FashionMNIST/raw/``, so the files are decompressed once into a
  cache directory (``$ROBUSTGATE_CACHE``, else ``~/.cache/robustgate``; written atomically, so
  concurrent processes are safe) and torchvision parses them from there. ``--data-dir`` may also
  point at a directory holding the ``.gz`` files, or at a torchvision root.
- ``mnist``, ``cifar10``: torchvision's own on-disk formats under ``--data-dir`` (nothing is
  downloaded at run time).
- ``imagefolder``: any ``torchvision.datasets.ImageFolder`` tree; ``data_dir/train`` and
  ``data_dir/test`` (one sub-folder per class). Images are loaded into memory, so this is for
  small datasets.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DATASETS = ("fashion-mnist", "mnist", "cifar10", "imagefolder")


class DatasetMissing(FileNotFoundError):
    """The dataset's files are not where they should be; the message says how to get them."""


@dataclass
class Splits:
    """Images ``[N, C, H, W]`` float32 in [0, 1]; labels ``[N]`` int64."""

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {which!r}")
        return getattr(self, f"{which}_x"), getattr(self, f"{which}_y")


def cache_dir() -> Path:
    return Path(os.environ.get("ROBUSTGATE_CACHE") or Path.home() / ".cache" / "robustgate")


def _fashion_mnist_root(data_dir: Path | None) -> Path:
    """A torchvision root with uncompressed ``FashionMNIST/raw/*`` files, preparing it if needed."""
    if data_dir is not None and all((Path(data_dir) / "FashionMNIST" / "raw" / f).is_file() for f in FASHION_MNIST_FILES):
        return Path(data_dir)
    source = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    missing = [f + ".gz" for f in FASHION_MNIST_FILES if not (source / (f + ".gz")).is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST not found: {source} lacks {', '.join(missing)}. Install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (puts the IDX files in {FASHION_MNIST_DIR}), "
            f"or pass --data-dir with the four .gz files or a torchvision root holding FashionMNIST/raw/."
        )
    root = cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in FASHION_MNIST_FILES:
        target = raw / f
        if target.is_file():
            continue
        with gzip.open(source / (f + ".gz"), "rb") as src, tempfile.NamedTemporaryFile(dir=raw, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, target)  # atomic: a concurrent reader sees the whole file or none
    return root


def _to_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [0, 1]."""
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t.unsqueeze(1)  # [N, 1, H, W]
    elif t.ndim == 4 and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)  # [N, C, H, W]
    return t.contiguous().float().div_(255.0)


def _load_raw(name: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    import torchvision

    if name == "fashion-mnist":
        root = _fashion_mnist_root(data_dir)
        tr = torchvision.datasets.FashionMNIST(str(root), train=True, download=False)
        te = torchvision.datasets.FashionMNIST(str(root), train=False, download=False)
        return _to_float(tr.data), tr.targets.long(), _to_float(te.data), te.targets.long(), list(FASHION_MNIST_CLASSES)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir (nothing is downloaded at run time)")
    data_dir = Path(data_dir)
    if name in ("mnist", "cifar10"):
        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
        try:
            tr = cls(str(data_dir), train=True, download=False)
            te = cls(str(data_dir), train=False, download=False)
        except RuntimeError as exc:
            raise DatasetMissing(f"{name} not found under {data_dir} in torchvision's format: {exc}") from exc
        classes = list(tr.classes)
        return (_to_float(np.asarray(tr.data)), torch.as_tensor(tr.targets).long(),
                _to_float(np.asarray(te.data)), torch.as_tensor(te.targets).long(), classes)
    if name == "imagefolder":
        out = []
        for part in ("train", "test"):
            if not (data_dir / part).is_dir():
                raise DatasetMissing(f"imagefolder: {data_dir / part} does not exist (need train/ and test/)")
            ds = torchvision.datasets.ImageFolder(str(data_dir / part), transform=torchvision.transforms.ToTensor())
            xs, ys = zip(*(ds[i] for i in range(len(ds))))
            out.append((torch.stack(xs), torch.tensor(ys, dtype=torch.long), ds.classes))
        (trx, try_, classes), (tex, tey, test_classes) = out
        if classes != test_classes:
            raise ValueError(f"imagefolder: train classes {classes} differ from test classes {test_classes}")
        return trx, try_, tex, tey, classes
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def load_splits(
    name: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    val_size: int = 5000,
    seed: int = 0,
) -> Splits:
    """Loads ``name`` and splits its training set into train / validation with ``seed``."""
    trx, trY, tex, tey, classes = _load_raw(name, Path(data_dir) if data_dir is not None else None)
    if not 0 <= val_size < len(trx):
        raise ValueError(f"val_size must be in [0, {len(trx)}), got {val_size}")
    perm = torch.randperm(len(trx), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return Splits(
        name=name, classes=classes,
        train_x=trx[train_idx], train_y=trY[train_idx],
        val_x=trx[val_idx], val_y=trY[val_idx],
        test_x=tex, test_y=tey,
        info={"val_size": val_size, "split_seed": seed, "train_size": len(train_idx), "test_size": len(tex)},
    )


def recipe_splits(recipe: dict) -> Splits:
    """The splits a backbone was trained on, from its bundle's training recipe (dataset, data dir,
    validation size and split seed, with the trainer's defaults where the recipe is silent)."""
    return load_splits(recipe.get("dataset", "fashion-mnist"), recipe.get("data_dir"),
                       val_size=int(recipe.get("val_size", 5000)), seed=int(recipe.get("seed", 0)))
