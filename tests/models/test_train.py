"""Trainer: every method lowers its loss, resume reproduces an uninterrupted run, DDP with 2
processes on the CPU, the CLI, the data split and the LR schedules."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustgate.models.archs import build_arch
from robustgate.models.bundle import Bundle
from robustgate.models.data import DatasetMissing, load_splits
from robustgate.models.losses import METHODS
from robustgate.models.train import TrainConfig, lr_at, train

ROOT = Path(__file__).resolve().parents[2]
TINY = {"width": 4, "hidden": 16}


@dataclasses.dataclass
class _LossCfg:
    eps: float = 0.1
    alpha: float = 0.05
    steps: int = 3
    restarts: int = 1
    beta: float = 6.0
    noise_sigma: float = 0.0


@pytest.mark.parametrize("method,noise", [(m, 0.0) for m in METHODS] + [("standard", 0.25)])
def test_every_method_lowers_its_loss(method, noise, fmnist_subset):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_arch("cnn", **TINY)
    x, y = fmnist_subset("train", 256)
    cfg = _LossCfg(noise_sigma=noise)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)

    def measured() -> float:  # same attack noise before and after, so the comparison is fair
        loss, logits = METHODS[method](model, x, y, cfg, torch.Generator().manual_seed(123))
        assert logits.shape == (256, 10) and torch.isfinite(loss)
        return loss.item()

    before = measured()
    gen = torch.Generator().manual_seed(7)
    for i in range(40):
        idx = torch.arange(i * 64, (i + 1) * 64) % 256
        loss, _ = METHODS[method](model, x[idx], y[idx], cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measured()
    assert after < before - 0.05, f"{method}: loss {before:.3f} -> {after:.3f}"


def _cfg(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(
        out=str(tmp_path / name), checkpoint_dir=str(tmp_path / f"{name}.ckpt"), method="fast-at", epochs=2,
        train_items=512, batch_size=64, max_steps_per_epoch=4, val_items=64, val_steps=2, test_items=64,
        test_steps=2, arch_kwargs=TINY, optimizer="adam", lr=2e-3, weight_decay=0.0, threads=1, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_continues_where_it_stopped(tmp_path):
    full = train(_cfg(tmp_path, "full"))
    first = train(_cfg(tmp_path, "split", stop_after=1))
    assert first["epochs_done"] == 1 and "metrics" not in first
    assert not (tmp_path / "split").exists(), "no bundle before the last epoch"
    meta = json.loads((tmp_path / "split.ckpt" / "last.json").read_text())
    assert meta["epoch"] == 1
    second = train(_cfg(tmp_path, "split", resume=True))
    assert second["weights_digest"] == full["weights_digest"]
    assert second["history"] == [{**h, "seconds": h2["seconds"], "images_per_s": h2["images_per_s"]}
                                 for h, h2 in zip(full["history"], second["history"])]
    a = load_file(str(tmp_path / "full" / "backbone.safetensors"))
    b = load_file(str(tmp_path / "split" / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the bundle records the threat model beside the numbers
    metrics = Bundle.load(tmp_path / "split").spec.backbone.metrics
    assert metrics["threat_model"]["eps"] == 0.1 and metrics["threat_model"]["items"] == 64
    assert 0 <= metrics["pgd2_accuracy"] <= metrics["clean_accuracy"] <= 1


def test_resume_refuses_a_changed_recipe(tmp_path):
    train(_cfg(tmp_path, "r", epochs=2, stop_after=1))
    with pytest.raises(ValueError, match="configuration changed.*'eps'"):
        train(_cfg(tmp_path, "r", epochs=2, resume=True, eps=0.2))


def test_eps_ramp_runs_and_bundle_loads(tmp_path):
    summary = train(_cfg(tmp_path, "ramp", method="pgd-at", steps=2, epochs=1, eps_ramp_epochs=2.0, select="last"))
    assert summary["metrics"]["selected_epoch"] == 1
    assert Bundle.load(tmp_path / "ramp").spec.backbone.recipe["eps_ramp_epochs"] == 2.0


def test_ddp_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
        "-m", "robustgate.proxy.cli", "train", "--method", "trades", "--steps", "2", "--epochs", "1",
        "--train-items", "512", "--batch-size", "64", "--max-steps-per-epoch", "3", "--val-items", "32",
        "--val-steps", "2", "--test-items", "32", "--test-steps", "2", "--arch-kwargs", json.dumps(TINY),
        "--threads", "1", "--no-progress", "--out", str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp.ckpt" / "last.json").read_text())
    assert meta["world_size"] == 2
    assert meta["history"][0]["train_acc"] >= 0  # both ranks' items counted:
    bundle = Bundle.load(tmp_path / "ddp")
    assert bundle.spec.backbone.metrics["processes"] == 2
    assert bundle.spec.provenance["launcher"] == "torchrun (DDP)"
    assert "pgd2_accuracy" in bundle.spec.backbone.metrics


def test_cli_help_explains_the_recipe(capsys):
    from robustgate.proxy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--method", "trades", "--eps", "--resume", "torchrun", "--noise-sigma", "examples:"):
        assert needle in out


def test_cli_missing_dataset_says_how_to_install(tmp_path, capsys):
    from robustgate.proxy.cli import main

    assert main(["train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_missing_dataset_raises(tmp_path):
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        load_splits("fashion-mnist", data_dir=tmp_path)


def test_split_is_seeded_fixed_and_disjoint(fmnist_splits):
    s = fmnist_splits
    assert s.info == {"val_size": 5000, "split_seed": 0, "train_size": 55000, "test_size": 10000}
    assert s.train_x.shape == (55000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert s.train_x.dtype == torch.float32 and 0 <= s.train_x.min() and s.train_x.max() <= 1
    again = load_splits("fashion-mnist", seed=0)
    assert torch.equal(again.val_y, s.val_y) and torch.equal(again.val_x[:50], s.val_x[:50])
    other = load_splits("fashion-mnist", seed=1)
    assert not torch.equal(other.val_y, s.val_y)
    # the validation items are held out: train + val is exactly the official training set
    assert torch.bincount(torch.cat([s.train_y, s.val_y])).tolist() == [6000] * 10


def test_bad_config_raises():
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(out="x", method="bogus")
    with pytest.raises(ValueError, match="method trades needs eps > 0"):
        TrainConfig(out="x", method="trades", eps=0.0)
    assert TrainConfig(out="x", method="fast-at", eps=0.1).alpha == pytest.approx(0.125)
    assert TrainConfig(out="x", method="pgd-at", eps=0.1, steps=10).alpha == pytest.approx(0.025)


def test_lr_schedules():
    assert lr_at("onecycle", 1.0, 0.0) == 0.0 and lr_at("onecycle", 1.0, 0.4) == pytest.approx(1.0)
    assert lr_at("onecycle", 1.0, 1.0) == 0.0
    assert lr_at("cosine", 1.0, 0.5) == pytest.approx(0.5)
    assert lr_at("multistep", 1.0, 0.8) == pytest.approx(0.01)
    assert lr_at("constant", 0.3, 0.9) == 0.3


def test_mnist_format_from_data_dir(tmp_path, fmnist_splits):
    # torchvision's MNIST layout is root/MNIST/raw/<IDX files>; the Fashion-MNIST files have that format
    from robustgate.models.data import FASHION_MNIST_FILES, cache_dir

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_MNIST_FILES:
        (raw / f).symlink_to(cache_dir() / "fashion-mnist" / "FashionMNIST" / "raw" / f)
    s = load_splits("mnist", data_dir=tmp_path, val_size=1000)
    assert s.train_x.shape == (59000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert len(s.classes) == 10
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_splits("cifar10")


def test_imagefolder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for part, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(tmp_path / part / cls / f"{i}.png")
    s = load_splits("imagefolder", data_dir=tmp_path, val_size=4, seed=0)
    assert s.classes == ["cat", "dog"]
    assert s.train_x.shape == (8, 3, 8, 8) and s.val_x.shape == (4, 3, 8, 8) and s.test_x.shape == (4, 3, 8, 8)
    assert 0 <= s.train_x.min() and s.train_x.max() <= 1
    assert sorted(torch.cat([s.train_y, s.val_y]).tolist()) == [0] * 6 + [1] * 6


def test_model_selection_default_follows_the_method(tmp_path):
    # a standard model's validation PGD accuracy is ~0 at every epoch: selecting on it would keep
    # an arbitrary epoch, so standard training selects on clean accuracy unless told otherwise
    assert _cfg(tmp_path, "s", method="standard").select == "clean"
    assert _cfg(tmp_path, "s", method="standard", noise_sigma=0.25).select == "clean"
    for method in ("fast-at", "pgd-at", "trades", "mart"):
        assert _cfg(tmp_path, "a", method=method).select == "robust"
    assert _cfg(tmp_path, "s", method="standard", select="last").select == "last"
