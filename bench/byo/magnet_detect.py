"""Does the MagNet detector still detect at 3x32x32 and 3x224x224 (issue 21)? On the RGB
ImageFolder stand-in (examples/make_rgb_imagefolder.py: Fashion-MNIST garments in colour, 32x32,
read through the data layer and conformed to the input shape), the detector with its default
parameters (``arch: auto``: II at 32x32, IV at 224x224) and the given others is fitted on clean
training images, calibrated at 1% FPR on clean validation images, and scored on clean test images
and on PGD examples (L-inf, torchattacks, 20 steps of eps/8, random start) made on a small CNN
trained here for a few epochs (the L1 reconstruction error does not read the classifier; the
classifier only shapes the perturbation). Non-adaptive attacks only: an attacker who targets the
detector too evades MagNet (defenses/detect/magnet.py).

    nice -n 10 python bench/byo/magnet_detect.py [--n-train 1000] [--epochs 5]

Writes bench/results/byo.magnet_detect.json + .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from robustgate.defenses import calibration as cal
from robustgate.defenses.base import FitData, build
from robustgate.defenses.detect.magnet import resolve_arch, resolve_downsample
from robustgate.models.data import load_splits

REPO = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from magnet_cost import machine  # noqa: E402  (bench/byo/magnet_cost.py: bench/serving/run.py's description)
EPS = (8 / 255, 0.1)
# (shape, label, params over the defaults)
RUNS = [((3, 32, 32), "default (auto: II)", {}),
        ((3, 224, 224), "default (auto: IV, 48 filters)", {}),
        ((3, 224, 224), "IV width 64", {"arch": "IV", "width": 64})]


def small_cnn(shape: tuple[int, int, int], classes: int) -> nn.Module:
    """``[N, C, H, W]`` -> ``[N, classes]``; the first convolution strides to about 32 pixels a side."""
    stride = max(1, shape[-1] // 32)
    return nn.Sequential(nn.Conv2d(shape[0], 32, stride + 2, stride=stride, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(64 * 16, classes))


def train_cnn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    import torchattacks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5, help="autoencoder epochs (the detector's default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="autoencoder batch size (the detector's default, 128, "
                                                               "leaves a few thousand images too few steps)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "byo.magnet_detect")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="robustgate-magnet-detect-"))
    subprocess.run([sys.executable, str(REPO / "examples" / "make_rgb_imagefolder.py"), "--out", str(work / "rgb32"),
                    "--train", str(args.n_train + args.n_val), "--test", str(args.n_test)], check=True)
    rows = []
    for shape, label, params in RUNS:
        sp = load_splits("imagefolder", work / "rgb32", val_size=args.n_val, seed=0, input_shape=shape)
        (tx, ty), (vx, vy), (sx, sy) = sp.split("train"), sp.split("val"), sp.split("test")
        torch.manual_seed(0)
        clf = train_cnn(small_cnn(shape, len(sp.classes)), tx, ty, epochs=3)
        with torch.no_grad():
            acc = (clf(sx).argmax(1) == sy).float().mean().item()
        det = build("magnet", **{"epochs": args.epochs, "batch_size": args.batch_size, **params})
        t0 = time.perf_counter()
        det.fit(FitData(tx, ty, vx, vy))
        fit_s = time.perf_counter() - t0
        with torch.no_grad():
            t = cal.threshold_at_fpr(det.score(vx), 0.01)
            clean = det.score(sx)
        row = {"shape": list(shape), "detector": label, "params": params,
               "arch": resolve_arch(det.arch, shape), "downsample": resolve_downsample(resolve_arch(det.arch, shape), det.downsample, shape),
               "fit_s": round(fit_s, 1), "final_loss": det.history[-1], "classifier_clean_acc": acc,
               "test_fpr": cal.fpr(clean, t), "attacks": []}
        for eps in EPS:
            adv = torchattacks.PGD(clf, eps=eps, alpha=eps / 8, steps=20, random_start=True)(sx, sy).detach()
            with torch.no_grad():
                fooled = (clf(adv).argmax(1) != sy).float().mean().item()
                attacked = det.score(adv)
            row["attacks"].append({"eps": eps, "fooled": fooled, "auc": cal.roc_auc(clean, attacked),
                                   "tpr_at_1pct_fpr": float((attacked > t).float().mean())})
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"command": "python bench/byo/magnet_detect.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started, "machine": machine(),
           "data": f"examples/make_rgb_imagefolder.py: {args.n_train} train + {args.n_val} validation, {args.n_test} test",
           "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# MagNet's detection at 3x32x32 and 3x224x224 (RGB ImageFolder stand-in)", "",
             f"Command: `{res['command']}` ({res['started_utc']}). Data: {res['data']} (32x32 PNGs conformed to the shape "
             "by the data layer). Detector: L1 reconstruction error, threshold at 1% FPR on the clean validation "
             f"images, {args.epochs} autoencoder epochs at batch size {args.batch_size}. Attack: PGD L-inf (torchattacks, 20 steps of eps/8, random "
             "start) on a small CNN trained here for 3 epochs; non-adaptive (the attacker ignores the detector).", "",
             "| shape | detector | arch, downsample | fit s | final loss | CNN clean acc | test FPR | eps | fooled | ROC AUC | TPR at 1% FPR |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for a in r["attacks"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['detector']} | {r['arch']}, {r['downsample']} | "
                         f"{r['fit_s']:.0f} | {r['final_loss']:.4f} | {r['classifier_clean_acc']:.2f} | {r['test_fpr']:.3f} | "
                         f"{a['eps']:.3f} | {a['fooled']:.2f} | {a['auc']:.3f} | {a['tpr_at_1pct_fpr']:.2f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
