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
  ``data_dir/test`` (one sub-folder per class), any image size and mode. Images are loaded into
  memory, so this is for small datasets.

Conforming to a model: a user's classifier fixes its input ``(C, H, W)``; ``load_splits(...,
input_shape=(C, H, W))`` (and :func:`bundle_splits`, which takes the shape from the bundle) turns
every image into that shape with torchvision's functional transforms, the same ones for every
command: channels first (grayscale -> RGB repeats the plane; RGB -> grayscale is ITU-R 601-2 luma,
torchvision's ``rgb_to_grayscale``; an ImageFolder image is decoded by Pillow straight to ``L`` or
``RGB``), then a bilinear, antialiased resize that makes the image just cover ``H x W`` keeping its
aspect ratio, then a centre crop to ``H x W``. ``Splits.info["transform"]`` records what was done
(``fit`` and ``import`` write it into the bundle).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
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


MAX_CONFORM_BYTES = 4 << 30  # the most a whole conformed split may take in memory (float32)


class Splits:
    """Images ``[N, C, H, W]`` float32 in [0, 1]; labels ``[N]`` int64; per split ``train``,
    ``val``, ``test``.

    With a ``shape`` ``(C, H, W)`` the images are stored as read and conformed to it (:func:`conform`)
    only when asked: ``take(split, n, offset)`` conforms just those items, and the attributes
    ``train_x`` / ``val_x`` / ``test_x`` conform (once, cached) the whole split, refusing with a
    clear message when that would take more than ``MAX_CONFORM_BYTES`` -- Fashion-MNIST's training
    set at 3x224x224 would be 33 GB; commands take subsets (``--n-train``, ``--n``)."""

    def __init__(self, name: str, classes: list[str], train_x: torch.Tensor, train_y: torch.Tensor,
                 val_x: torch.Tensor, val_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 info: dict | None = None, shape: tuple[int, int, int] | None = None):
        self.name, self.classes, self.info, self.shape = name, classes, dict(info or {}), shape
        self.train_y, self.val_y, self.test_y = train_y, val_y, test_y
        self._raw = {"train": train_x, "val": val_x, "test": test_x}
        self._conformed: dict[str, torch.Tensor] = {}

    @staticmethod
    def _check(which: str) -> None:
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {which!r}")

    def _needs_conform(self, raw: torch.Tensor) -> bool:
        return self.shape is not None and tuple(raw.shape[1:]) != tuple(self.shape)

    def _whole(self, which: str) -> torch.Tensor:
        if which not in self._conformed:
            raw = self._raw[which]
            if self._needs_conform(raw):
                need = len(raw) * 4 * int(np.prod(self.shape))
                if need > MAX_CONFORM_BYTES:
                    raise ValueError(
                        f"{self.name}: conforming all {len(raw)} {which} images to {tuple(self.shape)} would take "
                        f"{need / 2**30:.1f} GiB; take a subset (robustgate fit: --n-train, --n-val, --n-test; "
                        "eval, probe: --n; in code: Splits.take)")
                raw = torch.cat([conform(raw[i:i + 4096], self.shape) for i in range(0, len(raw), 4096)])
            self._conformed[which] = raw
        return self._conformed[which]

    train_x = property(lambda self: self._whole("train"))
    val_x = property(lambda self: self._whole("val"))
    test_x = property(lambda self: self._whole("test"))

    def size(self, which: str) -> int:
        self._check(which)
        return len(self._raw[which])

    def take(self, which: str, n: int | None = None, offset: int = 0,
             index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` items of split ``which`` from ``offset`` (or the items at ``index``), conformed:
        ``[n, C, H, W]``, ``[n]``. Conforms only what it returns."""
        self._check(which)
        raw, y = self._raw[which], getattr(self, f"{which}_y")
        if index is None:
            end = len(raw) if n is None else offset + n
            if end > len(raw) or offset < 0:
                raise ValueError(f"asked for items {offset}..{end} of {which}; it has {len(raw)}")
            sel, x = slice(offset, end), None
        else:
            sel = index
        if which in self._conformed:
            return self._conformed[which][sel], y[sel]
        x = raw[sel]
        return (conform(x, self.shape) if self._needs_conform(raw) else x), y[sel]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape) if self.shape is not None else tuple(self._raw["train"].shape[1:])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(which)
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


def cover_size(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """The ``(h', w')`` an ``h x w`` image is resized to so that it just covers ``target`` ``(H, W)``
    with its aspect ratio kept (the centre crop then cuts the rest)."""
    th, tw = target
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def conform(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[N, c, h, w]`` float in [0, 1] -> ``[N, C, H, W]`` (module docstring, "Conforming").

    Channels: 1 -> 3 repeats the plane, 3 -> 1 is luma; any other pair raises ``ValueError``.
    Space: bilinear antialiased resize to cover ``H x W`` keeping the aspect ratio, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    c, (C, H, W) = x.shape[1], shape
    if c != C:
        if (c, C) == (1, 3):
            x = x.expand(-1, 3, -1, -1)
        elif (c, C) == (3, 1):
            x = TF.rgb_to_grayscale(x)
        else:
            raise ValueError(f"cannot turn {c}-channel images into the model's {C} channels (only 1 <-> 3)")
    h, w = x.shape[-2:]
    if (h, w) != (H, W):
        x = TF.resize(x, list(cover_size(h, w, (H, W))), antialias=True).clamp_(0.0, 1.0)
        x = TF.center_crop(x, [H, W])
    return x.contiguous()


def describe_transform(source: tuple[int, ...] | None, shape: tuple[int, int, int]) -> dict:
    """What :func:`conform` does to ``source`` ``(c, h, w)`` images (None: sizes vary, as in an
    ImageFolder) to reach ``shape``: the record ``fit`` and ``import`` keep in the bundle."""
    C, H, W = shape
    rec: dict = {"to_shape": [C, H, W], "interpolation": "bilinear", "antialias": True}
    if source is None:
        rec.update(channels=f"decoded as {'RGB' if C == 3 else 'L'}", resize="cover (aspect kept)", center_crop=[H, W])
        return rec
    c, h, w = source
    rec["channels"] = None if c == C else f"{c}->{C}"
    if (h, w) != (H, W):
        rec.update(resize=list(cover_size(h, w, (H, W))), center_crop=[H, W])
    else:
        rec.update(resize=None, center_crop=None)
    return rec


def _imagefolder_part(root: Path, input_shape: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One ImageFolder part (``train`` or ``test``) as ``[N, C, H, W]``, labels ``[N]``, classes.

    Without ``input_shape`` every image must have the same size (its first image's mode decides
    RGB or L); with it, each image is decoded to the shape's mode and conformed on its own."""
    import torchvision
    from PIL import Image

    if not root.is_dir():
        raise DatasetMissing(f"imagefolder: {root} does not exist (need train/ and test/)")
    ds = torchvision.datasets.ImageFolder(str(root), loader=lambda p: Image.open(p))
    if len(ds) == 0:
        raise DatasetMissing(f"imagefolder: {root} holds no images")
    to_tensor = torchvision.transforms.functional.pil_to_tensor
    if input_shape is not None:
        mode = "RGB" if input_shape[0] == 3 else "L"
        if input_shape[0] not in (1, 3):
            raise ValueError(f"imagefolder: images decode to 1 or 3 channels, the model wants {input_shape[0]}")
    else:
        first = ds[0][0]
        mode = "L" if first.mode in ("L", "1", "I;16", "I", "F") else "RGB"
    xs, ys = [], []
    for img, y in ds:
        t = to_tensor(img.convert(mode)).float().div_(255.0).unsqueeze(0)  # [1, C, h, w]
        if input_shape is not None:
            t = conform(t, input_shape)
        elif xs and t.shape != xs[0].shape:
            raise ValueError(f"imagefolder: {root} holds images of different sizes ({tuple(xs[0].shape[1:])} and "
                             f"{tuple(t.shape[1:])}); give the model's input shape (a bundle or --input-shape) to resize them")
        xs.append(t)
        ys.append(y)
    return torch.cat(xs), torch.tensor(ys, dtype=torch.long), list(ds.classes)


def _load_raw(name: str, data_dir: Path | None, input_shape: tuple[int, int, int] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
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
        out = [_imagefolder_part(data_dir / part, input_shape) for part in ("train", "test")]
        (trx, try_, classes), (tex, tey, test_classes) = out
        if classes != test_classes:
            raise ValueError(f"imagefolder: train classes {classes} differ from test classes {test_classes}")
        return trx, try_, tex, tey, classes
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def load_splits(
    name: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    val_size: int | None = 5000,
    seed: int = 0,
    input_shape: tuple[int, int, int] | None = None,
) -> Splits:
    """Loads ``name`` and splits its training set into train / validation with ``seed``.

    ``val_size`` None: 5,000 or a tenth of the training set, whichever is smaller.
    ``input_shape`` ``(C, H, W)``: every image conformed to it (module docstring)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    trx, trY, tex, tey, classes = _load_raw(name, Path(data_dir) if data_dir is not None else None, shape)
    if name == "imagefolder":  # ImageFolder lists its test images class by class; a seeded shuffle makes
        # "the first n test images" (eval, probe) a sample of every class, as in the official test sets
        order = torch.randperm(len(tex), generator=torch.Generator().manual_seed(seed))
        tex, tey = tex[order], tey[order]
    source = None if name == "imagefolder" else tuple(trx.shape[1:])
    transform = None
    if shape is not None:
        transform = describe_transform(source, shape)  # applied lazily by Splits (imagefolder: already)
    if val_size is None:
        val_size = min(5000, len(trx) // 10)
    if not 0 <= val_size < len(trx):
        raise ValueError(f"val_size must be in [0, {len(trx)}), got {val_size}")
    perm = torch.randperm(len(trx), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    info = {"val_size": val_size, "split_seed": seed, "train_size": len(train_idx), "test_size": len(tex)}
    if transform is not None:
        info["transform"] = transform
    return Splits(
        name=name, classes=classes,
        train_x=trx[train_idx], train_y=trY[train_idx],
        val_x=trx[val_idx], val_y=trY[val_idx],
        test_x=tex, test_y=tey,
        info=info, shape=shape,
    )


def recipe_splits(recipe: dict) -> Splits:
    """The splits a backbone was trained on, from its bundle's training recipe (dataset, data dir,
    validation size and split seed, with the trainer's defaults where the recipe is silent)."""
    return load_splits(recipe.get("dataset", "fashion-mnist"), recipe.get("data_dir"),
                       val_size=int(recipe.get("val_size", 5000)), seed=int(recipe.get("seed", 0)))


def bundle_splits(bundle, dataset: str | None = None, data_dir: str | Path | None = None,
                  val_size: int | None = None, seed: int | None = None) -> Splits:
    """The data a bundle is fitted and evaluated on, conformed to its input shape.

    ``dataset`` / ``data_dir`` default to the bundle's training recipe (``robustgate train`` and
    ``robustgate import --dataset`` record them), else Fashion-MNIST; the validation size and split
    seed default to the recipe's when the dataset is the recipe's (so the validation split is never
    one the backbone trained on), else to :func:`load_splits`' defaults."""
    recipe = bundle.spec.backbone.recipe or {}
    own = recipe.get("dataset", "fashion-mnist")
    name = dataset or own
    same = name == own
    if data_dir is None and same:
        data_dir = recipe.get("data_dir")
    if val_size is None:
        val_size = int(recipe["val_size"]) if same and "val_size" in recipe else (5000 if name == "fashion-mnist" else None)
    if seed is None:
        seed = int(recipe.get("seed", 0)) if same else 0
    return load_splits(name, data_dir, val_size=val_size, seed=seed, input_shape=tuple(bundle.input.shape))


def add_data_arguments(parser, *, default: str | None = None) -> None:
    """The ``--dataset`` / ``--data-dir`` pair every command takes (train, fit, eval, probe, import).
    ``default`` None: the bundle's recipe decides (:func:`bundle_splits`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=default,
                   help="dataset (default: " + (default or "the bundle recipe's dataset, else fashion-mnist") + ")")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="dataset root: fashion-mnist the four .gz files (default: Debian's "
                        f"{FASHION_MNIST_DIR}); mnist/cifar10 torchvision's format; imagefolder train/ and test/ "
                        "with one sub-folder per class")
