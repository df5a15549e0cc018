"""Fashion-MNIST for a machine without it: the IDX files, optionally with fewer training images.

    python bench/gpu/pack_data.py [--src /usr/share/datasets/fashion-mnist] [--out .gpu-data/fashion-mnist] \\
        [--train-items N]

The GPU machine has no dataset and reaches no registry: its data travels with the working tree
(64 MiB per call with the wheels). All four files are 30 MB; ``--train-items N`` keeps the test set
whole and the first N training images (a valid IDX file with its count rewritten), so that
``--train-items 12000`` (train 7,000 + the 5,000 validation images) packs about 7 MB.
bench/gpu/check.sh links the folder to where models/data.py reads it.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
import sys
from pathlib import Path

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def head_idx(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` records of the gzipped IDX file ``src`` into ``dst`` (the IDX header: magic
    with the number of dimensions in its last byte, then one big-endian uint32 per dimension)."""
    data = gzip.open(src).read()
    ndim = data[3]
    dims = list(struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim]))
    record = 1
    for d in dims[1:]:
        record *= d
    dims[0] = min(n, dims[0])
    body = data[4 + 4 * ndim: 4 + 4 * ndim + dims[0] * record]
    with gzip.open(dst, "wb") as fh:
        fh.write(data[:4] + struct.pack(f">{ndim}I", *dims) + body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=Path(".gpu-data/fashion-mnist"))
    ap.add_argument("--train-items", type=int, default=None)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        src, dst = args.src / (f + ".gz"), args.out / (f + ".gz")
        if args.train_items is not None and f.startswith("train"):
            head_idx(src, dst, args.train_items)
        else:
            shutil.copyfile(src, dst)
    total = sum((args.out / (f + ".gz")).stat().st_size for f in FILES)
    print(f"wrote {args.out} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
