"""The one data layer: any dataset conformed to a model's (C, H, W), recorded; ImageFolder of mixed
sizes and modes; a bundle's data from its recipe; the --dataset/--data-dir pair."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from robustgate.models.bundle import Bundle
from robustgate.models.data import (
    DATASETS, add_data_arguments, bundle_splits, conform, cover_size, describe_transform, load_splits,
)


def test_cover_size_keeps_aspect_and_covers():
    assert cover_size(28, 28, (32, 32)) == (32, 32)
    assert cover_size(40, 80, (32, 32)) == (32, 64)  # shorter side to 32
    assert cover_size(100, 50, (64, 32)) == (64, 32)
    h, w = cover_size(30, 45, (224, 224))
    assert h >= 224 and w >= 224 and abs(w / h - 1.5) < 0.01


def test_conform_channels_and_size():
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(4, 1, 28, 28, generator=g)
    rgb = conform(gray, (3, 32, 32))
    assert rgb.shape == (4, 3, 32, 32) and 0 <= rgb.min() and rgb.max() <= 1
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])  # grey stays grey
    back = conform(rgb, (1, 32, 32))
    assert back.shape == (4, 1, 32, 32) and torch.allclose(back, rgb[:, :1], atol=1e-3)  # luma of grey is grey (601-2 weights sum to 0.9999)
    assert torch.equal(conform(gray, (1, 28, 28)), gray)  # nothing to do: unchanged
    wide = torch.rand(2, 3, 20, 40, generator=g)
    out = conform(wide, (3, 16, 16))  # resized to 16 x 32, centre 16 x 16 kept
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="2-channel images into the model's 3 channels"):
        conform(torch.rand(1, 2, 8, 8), (3, 8, 8))


def test_describe_transform():
    assert describe_transform((1, 28, 28), (1, 28, 28))["resize"] is None
    rec = describe_transform((1, 28, 28), (3, 224, 224))
    assert rec["channels"] == "1->3" and rec["resize"] == [224, 224] and rec["center_crop"] == [224, 224]
    assert describe_transform(None, (3, 32, 32))["channels"] == "decoded as RGB"


def _imagefolder(root, sizes, mode="RGB", per_class=4):
    g = torch.Generator().manual_seed(1)
    for part in ("train", "test"):
        for cls in ("a", "b"):
            (root / part / cls).mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).convert(mode).save(root / part / cls / f"{i}.png")


def test_imagefolder_mixed_sizes_needs_a_shape_then_conforms(tmp_path):
    _imagefolder(tmp_path, [(20, 30), (64, 48), (32, 32)])
    with pytest.raises(ValueError, match="images of different sizes"):
        load_splits("imagefolder", data_dir=tmp_path, val_size=2)
    s = load_splits("imagefolder", data_dir=tmp_path, val_size=None, input_shape=(3, 24, 24))
    assert s.train_x.shape[1:] == (3, 24, 24) and s.test_x.shape == (8, 3, 24, 24)
    assert s.info["val_size"] == 0 and s.info["transform"]["center_crop"] == [24, 24]
    gray = load_splits("imagefolder", data_dir=tmp_path, val_size=1, input_shape=(1, 16, 16))
    assert gray.train_x.shape[1:] == (1, 16, 16)


def test_grayscale_imagefolder_to_rgb_model(tmp_path):
    _imagefolder(tmp_path, [(28, 28)], mode="L")
    s = load_splits("imagefolder", data_dir=tmp_path, val_size=2)
    assert s.train_x.shape[1:] == (1, 28, 28)  # decoded as it is stored
    s3 = load_splits("imagefolder", data_dir=tmp_path, val_size=2, input_shape=(3, 32, 32))
    assert s3.train_x.shape[1:] == (3, 32, 32) and torch.equal(s3.train_x[:, 0], s3.train_x[:, 2])


def test_fashion_mnist_conformed_for_an_rgb_model(fmnist_splits):
    s = load_splits("fashion-mnist", seed=0, input_shape=(3, 32, 32))
    assert s.test_x.shape == (10000, 3, 32, 32) and s.train_x.shape == (55000, 3, 32, 32)
    assert s.info["transform"]["channels"] == "1->3" and s.info["transform"]["resize"] == [32, 32]
    assert torch.equal(s.val_y, fmnist_splits.val_y)  # same split, only the pixels are conformed


def test_bundle_splits_follow_the_recipe(fmnist_splits):
    bundle = Bundle.load("bundles/default")
    s = bundle_splits(bundle)
    assert s.test_x.shape == (10000, 1, 28, 28) and torch.equal(s.val_y, fmnist_splits.val_y)
    assert s.info["transform"]["resize"] is None and s.info["transform"]["channels"] is None


def test_add_data_arguments():
    p = argparse.ArgumentParser()
    add_data_arguments(p)
    a = p.parse_args(["--dataset", "imagefolder", "--data-dir", "/x"])
    assert a.dataset == "imagefolder" and str(a.data_dir) == "/x"
    assert p.parse_args([]).dataset is None
    with pytest.raises(SystemExit):
        p.parse_args(["--dataset", "imagenet"])
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "imagefolder"}


def test_unknown_dataset_named():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_splits("svhn")


def test_large_shapes_conform_lazily_and_refuse_whole_splits(fmnist_splits):
    s = load_splits("fashion-mnist", seed=0, input_shape=(3, 224, 224))
    x, y = s.take("test", 4, offset=10)  # only these four are conformed
    assert x.shape == (4, 3, 224, 224) and torch.equal(y, fmnist_splits.test_y[10:14])
    assert s.size("train") == 55000 and s.input_shape == (3, 224, 224)
    with pytest.raises(ValueError, match=r"would take 30\.8 GiB; take a subset"):
        s.train_x  # noqa: B018 - the attribute conforms the whole split
    xi, yi = s.take("val", index=torch.tensor([0, 5]))
    assert xi.shape == (2, 3, 224, 224) and torch.equal(yi, fmnist_splits.val_y[[0, 5]])
    with pytest.raises(ValueError, match="asked for items 9998..10002 of test"):
        s.take("test", 4, offset=9998)


def test_imagefolder_test_split_is_a_seeded_mix_of_classes(tmp_path):
    _imagefolder(tmp_path, [(8, 8)], per_class=20)
    s = load_splits("imagefolder", data_dir=tmp_path, val_size=4, seed=0)
    first = s.test_y[:10].tolist()
    assert set(first) == {0, 1}, first  # not 10 images of the first class
    assert torch.equal(load_splits("imagefolder", data_dir=tmp_path, val_size=4, seed=0).test_y, s.test_y)
    assert sorted(s.test_y.tolist()) == [0] * 20 + [1] * 20
