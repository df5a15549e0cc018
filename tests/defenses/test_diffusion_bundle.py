"""The diffusion purifier fitted into a bundle by `robustgate fit --defense diffusion` (a tiny UNet,
a few training steps): safetensors + JSON + ONNX recorded with sha256 in bundle.yaml, no pickle;
reloaded from the bundle bit-identically to the same fit done by hand; and served by the real
proxy (ONNX Runtime UNet, fixed pipeline seed) to tritonclient, whose logits must equal the torch
twin's purify -> backbone offline."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import yaml

from robustgate.defenses.base import FitData, build
from robustgate.defenses.cli import load_splits
from robustgate.models.bundle import Bundle
from robustgate.models.twin import load_backbone
from robustgate.proxy.cli import main as robustgate

from loopback import LoopbackProxy

PARAMS = {"block_out_channels": [8, 16], "train_steps": 4, "batch_size": 8, "t_star": 80, "steps": 2,
          "train_t_max": 300, "seed": 3}
N_TRAIN, SEED = 64, 0


@pytest.fixture(scope="module")
def fitted(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-bundle") / "bundle"
    shutil.copytree(tiny_bundle, root)
    argv = ["fit", "--bundle", str(root), "--defense", "diffusion", "--n-train", str(N_TRAIN), "--n-val", "16",
            "--n-test", "16", "--seed", str(SEED), "--params", *[f"{k}={v}" for k, v in PARAMS.items()]]
    assert robustgate(argv) == 0
    return root


def test_fit_records_safetensors_json_and_onnx_with_checksums(fitted):
    raw = yaml.safe_load((fitted / "bundle.yaml").read_text())
    spec = raw["defenses"]["diffusion"]
    assert spec["kind"] == "diffusion" and spec.get("threshold") is None
    assert {k: v for k, v in spec["params"].items() if k in PARAMS} == PARAMS
    assert set(spec["files"]) == {"weights", "config", "onnx"}
    suffixes = set()
    for art in spec["files"].values():
        path = fitted / art["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == art["sha256"]
        assert path.read_bytes()[:1] != b"\x80", f"{path} looks like a pickle"
        suffixes.add(path.suffix)
    assert suffixes == {".safetensors", ".json", ".onnx"}
    Bundle.load(fitted)  # verifies every sha256


def test_reloads_bit_identically_to_the_same_fit_by_hand(fitted):
    bundle = Bundle.load(fitted)
    spec = bundle.defense("diffusion")
    loaded = build(spec.kind, **spec.params)
    loaded.load_artifacts({r: bundle.path(a) for r, a in spec.files.items()})
    # the CLI's data: the trainer's splits, subset by --seed (defenses.cli.load_splits)
    (tx, ty), (vx, vy) = [load_splits(n_train=N_TRAIN, n_val=16, n_test=16, seed=SEED)[k] for k in ("train", "val")]
    torch.manual_seed(SEED)
    by_hand = build("diffusion", **PARAMS)
    by_hand.fit(FitData(tx, ty, vx, vy))
    want, got = by_hand.unet.state_dict(), loaded.unet.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert loaded.training_record["steps"] == PARAMS["train_steps"]
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded.purify(x, torch.Generator().manual_seed(1)), by_hand.purify(x, torch.Generator().manual_seed(1)))


def test_served_through_the_proxy_with_the_onnx_unet(fitted):
    bundle = Bundle.load(fitted)
    spec = bundle.defense("diffusion")
    twin = build(spec.kind, **spec.params)  # torch runtime: the red team's twin
    twin.load_artifacts({r: bundle.path(a) for r, a in spec.files.items()})
    backbone = load_backbone(bundle)
    x = load_splits(n_test=6, seed=5)["test"][0]  # [6, 1, 28, 28]
    seed = 1234
    with torch.no_grad():
        want = backbone(twin.purify(x, torch.Generator().manual_seed(seed))).numpy()
        undefended = backbone(x).numpy()
    proxy = LoopbackProxy(fitted, {"stages": [{"name": "diffusion", "kind": "diffusion", "action": "log",
                                       "params": {"runtime": "onnx", "onnx_threads": 1}}], "seed": seed})
    try:
        client = tc.InferenceServerClient(proxy.url)
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        res = client.infer(bundle.name, [inp])
        np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), np.zeros(6))
        got = res.as_numpy("logits")
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
        assert np.abs(got - undefended).max() > 1e-2  # the purifier ran
    finally:
        proxy.stop()


def test_the_stage_params_override_the_fitted_ones(fitted):
    """t_star = 0 from the config turns the fitted purifier into the identity: served logits are the backbone's."""
    bundle = Bundle.load(fitted)
    x = load_splits(n_test=4, seed=6)["test"][0]
    with torch.no_grad():
        want = load_backbone(bundle)(x).numpy()
    proxy = LoopbackProxy(fitted, {"stages": [{"name": "diffusion", "kind": "diffusion", "params": {"runtime": "onnx", "t_star": 0}}]})
    try:
        client = tc.InferenceServerClient(proxy.url)
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        np.testing.assert_allclose(client.infer(bundle.name, [inp]).as_numpy("logits"), want, atol=1e-4, rtol=1e-4)
    finally:
        proxy.stop()
