"""Trains the diffusion purifier's DDPM on Fashion-MNIST with its default recipe and saves the
artifacts (safetensors + JSON), logging JSON lines -- the budget measurement behind
defenses/purify/diffusion.py's docstring. ``robustgate fit --defense diffusion`` runs the same
``fit`` into a bundle.

    .venv/bin/python bench/defenses/train_diffusion.py --out /tmp/diffusion-fmnist [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from robustgate.defenses.base import FitData, build
from robustgate.models.data import load_splits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", default="{}", help="JSON constructor overrides, e.g. '{\"train_steps\": 200}'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = load_splits("fashion-mnist", seed=0)
    purifier = build("diffusion", **json.loads(args.params))
    print(json.dumps({"event": "start", "config": purifier.config(), "train_items": len(splits.train_x),
                      "threads": args.threads, "time": time.strftime("%H:%M:%S")}), flush=True)
    data = FitData(splits.train_x, splits.train_y, splits.val_x, splits.val_y)
    purifier.fit(data, log=lambda rec: print(json.dumps(rec), flush=True))
    files = purifier.save(args.out)
    (args.out / "params.json").write_text(json.dumps(purifier.config(), indent=2) + "\n")
    print(json.dumps({"event": "done", "files": files, "record": purifier.training_record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
