"""Builds an RGB 32x32 ImageFolder from Fashion-MNIST: a stand-in for CIFAR-10 on a machine that
cannot download it (docs/BYO.md).

Each 28x28 grey garment becomes a colour image: the garment's intensity blends a random foreground
colour over a random, darker background colour, with mild per-pixel noise, padded to 32x32 (the
CIFAR-10 size) and written as PNG under ``OUT/{train,test}/<class>/``. The colours carry no label
information, so a classifier must learn the shapes in colour, as on natural images; the class names
are Fashion-MNIST's. Deterministic for a seed.

    python examples/make_rgb_imagefolder.py --out /tmp/rgb32 --train 20000 --test 2000
"""

from __future__ import annotations

import argparse
import colorsys
import gzip
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a numpy array (the format's header gives the dims)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def random_colour(rng: np.random.Generator, value: tuple[float, float]) -> np.ndarray:
    """An RGB colour in [0, 1] with a uniform hue, saturation in [0.4, 1] and value in ``value``."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(*value)))


def colourize(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[28, 28]`` uint8 -> ``[32, 32, 3]`` uint8: foreground over background, noise, 2-pixel pad."""
    m = np.pad(grey.astype(np.float32) / 255.0, 2)[..., None]  # [32, 32, 1]
    fg, bg = random_colour(rng, (0.6, 1.0)), random_colour(rng, (0.05, 0.45))
    img = bg * (1 - m) + fg * m + rng.normal(0.0, 0.03, size=(32, 32, 3))
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_part(out: Path, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, desc: str) -> None:
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(tqdm(list(zip(images, labels)), desc=desc, unit="img")):
        Image.fromarray(colourize(img, rng)).save(out / CLASSES[y] / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="ImageFolder root to write (train/ and test/)")
    ap.add_argument("--source", type=Path, default=FASHION_MNIST, help="folder with Fashion-MNIST's four .gz files")
    ap.add_argument("--train", type=int, default=20000, help="training images (the first N of Fashion-MNIST's train set)")
    ap.add_argument("--test", type=int, default=2000, help="test images (the first N of its test set)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for part, prefix, n in (("train", "train", args.train), ("test", "t10k", args.test)):
        x = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")[:n]
        y = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        write_part(args.out / part, x, y, rng, part)
    print(f"wrote {args.train} + {args.test} RGB 32x32 images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
