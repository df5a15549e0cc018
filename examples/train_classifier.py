"""A user's own classifier, written in plain PyTorch with no robustgate code: trained the usual
(standard, non-robust) way and exported to ONNX, the way most teams arrive at robustgate
(docs/BYO.md walks through protecting it).

    python examples/train_classifier.py --dataset fashion-mnist --out /tmp/user/model.onnx
    python examples/train_classifier.py --dataset fashion-mnist --n-train 10000 --width 16 --out /tmp/user/model.onnx  # examples/byo.sh's size
    python examples/train_classifier.py --dataset imagefolder --data-dir /tmp/rgb32 --out /tmp/user-rgb/model.onnx
    python examples/train_classifier.py --dataset cifar10 --data-dir ~/data --out /tmp/cifar/model.onnx

The model takes raw pixels in [0, 1] (``[N, C, H, W]`` float32) and normalizes inside the graph;
its ONNX graph has a dynamic batch axis, the logits output ``logits`` and a second output
``features`` (the penultimate activations; robustgate's SafetyNet detector can use it). A
``classes.txt`` with one class name per line is written next to the model.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class SmallNet(nn.Module):
    """Three conv blocks and a linear head: ``[N, C, H, W]`` -> logits ``[N, K]``."""

    def __init__(self, channels: int, classes: int, mean: list[float], std: list[float], width: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(channels, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, 128]
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, K]
        return self.head(self.features(x))


class WithFeatures(nn.Module):
    """The export wrapper: logits and features in one graph."""

    def __init__(self, net: SmallNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        f = self.net.features(x)
        return self.net.head(f), f


def datasets(name: str, data_dir: Path | None):
    tf = torchvision.transforms.ToTensor()
    if name == "fashion-mnist":  # torchvision wants the uncompressed files under root/FashionMNIST/raw
        root = Path(tempfile.mkdtemp(prefix="fmnist-"))
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in (data_dir or FASHION_MNIST).glob("*-ubyte.gz"):
            with gzip.open(f) as src, open(raw / f.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        make = lambda train: torchvision.datasets.FashionMNIST(str(root), train=train, transform=tf)  # noqa: E731
    elif name == "cifar10":
        make = lambda train: torchvision.datasets.CIFAR10(str(data_dir), train=train, transform=tf)  # noqa: E731
    else:
        make = lambda train: torchvision.datasets.ImageFolder(str(data_dir / ("train" if train else "test")), transform=tf)  # noqa: E731
    return make(True), make(False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "imagefolder"], default="fashion-mnist")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=None, help="train on the first N training images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    train, test = datasets(args.dataset, args.data_dir)
    classes = list(train.classes)
    if args.n_train is not None:
        train = torch.utils.data.Subset(train, range(min(args.n_train, len(train))))
    x0 = train[0][0]
    c = x0.shape[0]
    stats = torch.stack([train[i][0] for i in range(0, len(train), max(1, len(train) // 2000))])
    mean = stats.mean(dim=(0, 2, 3)).tolist()
    std = stats.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    net = SmallNet(c, len(classes), mean, std, args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    steps = args.epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        net.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for x, y in bar:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=500):
            correct += (net(x).argmax(1) == y).sum().item()
            total += len(y)
    print(f"test accuracy {correct / total:.4f} on {total} images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(WithFeatures(net), (x0.unsqueeze(0),), str(args.out), input_names=["input"],
                      output_names=["logits", "features"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"},
                                                                       "features": {0: "batch"}}, dynamo=False)
    (args.out.parent / "classes.txt").write_text("\n".join(classes) + "\n")
    print(f"wrote {args.out} and {args.out.parent / 'classes.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
