"""Shared fixtures: a small trained Fashion-MNIST bundle and Fashion-MNIST subsets.

- ``fmnist_subset(split, n) -> (x [n, 1, 28, 28] float32 in [0, 1], y [n] int64)``: the first
  ``n`` items of the seeded train / val / test split (``robustgate.models.data.load_splits``,
  seed 0), the same on every call.
- ``tiny_bundle -> pathlib.Path``: a bundle directory (built once per session in a tmp dir) with
  a tiny CNN (``cnn``, width 8, hidden 32) trained for 300 steps on 4,000 training images -- about
  80% test accuracy, clearly better than chance, clearly not robust -- exported with ``logits``
  and ``features`` outputs. ``bundle.yaml``'s ``backbone.metrics`` holds its measured accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_ARCH_KWARGS = {"width": 8, "hidden": 32}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """The TLS tests' certificates (tests/helpers/pki.py): ca, server, client, other, and rogue's intruder."""
    from pki import make_pki  # tests/helpers

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def fmnist_splits():
    from robustgate.models.data import load_splits

    return load_splits("fashion-mnist", seed=0)


@pytest.fixture(scope="session")
def fmnist_subset(fmnist_splits):
    def subset(split: str = "test", n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = fmnist_splits.split(split)
        if not 0 < n <= len(x):
            raise ValueError(f"n must be in (0, {len(x)}] for split {split!r}, got {n}")
        return x[:n].clone(), y[:n].clone()

    return subset


@pytest.fixture(scope="session")
def knn_encoder(tmp_path_factory, fmnist_subset):
    """A fitted k-NN encoder (defenses/stateful/knn.py) written as encoder.onnx: its path. Tiny (20
    steps): for the fusing and parity tests, not for detection."""
    from robustgate.defenses.base import FitData
    from robustgate.defenses.stateful.knn import KnnDetector

    x, _ = fmnist_subset("train", 64)
    det = KnnDetector(k=2, dim=8, width=4, steps=20, batch_size=16)
    with torch.random.fork_rng():  # the encoder's initial weights from torch's global generator: the same
        torch.manual_seed(0)  # encoder whichever tests ran before (and the global state left as it was)
        det.fit(FitData(x, torch.zeros(64), x[:8], torch.zeros(8)))
    directory = tmp_path_factory.mktemp("knn")
    det.save(directory)
    return directory / "encoder.onnx"


def _train_tiny(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    from robustgate.models.archs import build_arch

    torch.manual_seed(seed)
    model = build_arch("cnn", **TINY_ARCH_KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, fmnist_subset, fmnist_splits) -> Path:
    from robustgate.models.export import write_bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = fmnist_subset("train", 4000)
        model = _train_tiny(x, y, steps=300, seed=0)
        tx, ty = fmnist_subset("test", 1000)
        with torch.no_grad():
            acc = (model(tx).argmax(1) == ty).float().mean().item()
        assert acc > 0.6, f"tiny bundle model only reached {acc:.3f} test accuracy"
        out = tmp_path_factory.mktemp("bundles") / "tiny"
        write_bundle(
            out, model, arch="cnn", arch_kwargs=TINY_ARCH_KWARGS, classes=fmnist_splits.classes,
            input_shape=(1, 28, 28), name="tiny", features=True,
            recipe={"method": "standard", "steps": 300, "batch_size": 64, "train_items": 4000, "optimizer": "adam"},
            metrics={"clean_accuracy": acc, "clean_accuracy_items": len(tx)}, seed=0, probe=tx[:8],
        )
    finally:
        torch.set_num_threads(threads)
    return out
