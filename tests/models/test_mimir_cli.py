"""`robustgate train --method mae-pretrain|mimir-pretrain` then `--init` for adversarial fine-tuning."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from safetensors.torch import load_file

from robustgate.models.bundle import Bundle
from robustgate.models.mimir import load_pretrained
from robustgate.proxy.cli import main

from loopback import LoopbackProxy

TINY_VIT = '{"dim": 32, "depth": 1, "heads": 2}'
COMMON = ["--dataset", "fashion-mnist", "--arch", "vit_tiny", "--arch-kwargs", TINY_VIT, "--train-items", "64",
          "--batch-size", "32", "--threads", "1", "--no-progress", "--epochs", "1"]


@pytest.mark.parametrize("method", ["mae-pretrain", "mimir-pretrain"])
def test_pretrain_then_init_loads_the_encoder_into_the_bundle(tmp_path, capsys, method):
    pre = tmp_path / "pre"
    assert main(["train", *COMMON, "--method", method, "--eps", "0.1", "--lr", "1e-3", "--out", str(pre)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method and len(report["loss_per_epoch"]) == 1
    ckpt = pre / "pretrained.safetensors"
    encoder = load_pretrained(ckpt).encoder_state_dict()

    # lr 0 with Adam and no weight decay leaves the initial weights as they are: the exported
    # classifier's encoder must then be exactly the pre-trained one
    out = tmp_path / "fine"
    assert main(["train", *COMMON, "--method", "standard", "--init", str(ckpt), "--optimizer", "adam", "--lr", "0",
                 "--weight-decay", "0", "--max-steps-per-epoch", "1", "--val-items", "16", "--val-steps", "1",
                 "--test-items", "16", "--test-steps", "1", "--no-features", "--out", str(out)]) == 0
    bundle = Bundle.load(out)
    weights = load_file(str(bundle.path(bundle.spec.backbone.weights)))
    assert bundle.spec.backbone.recipe["init"] == str(ckpt)
    for key, value in encoder.items():
        assert key in weights, key
        assert weights[key].equal(value), key

    # ... and the fine-tuned ViT is served: a loopback proxy answers tritonclient with ONNX Runtime's logits
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    want = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)),
                                providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    proxy = LoopbackProxy(out, {"stages": []})
    try:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with tc.InferenceServerClient(proxy.url) as client:
            got = client.infer(bundle.name, [inp]).as_numpy("logits")
    finally:
        proxy.stop()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mimir_pretraining_with_carried_deltas(tmp_path, capsys):
    assert main(["train", *COMMON, "--method", "mimir-pretrain", "--mi-perturbation", "carry", "--eps", "0.1",
                 "--out", str(tmp_path / "pre")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perturbation"] == "carry" and report["pgd_seconds_per_epoch"][0] > 0
    assert load_pretrained(tmp_path / "pre" / "pretrained.safetensors").config["dim"] == 32


def test_pretraining_needs_vit_tiny(tmp_path, capsys):
    rc = main(["train", "--arch", "cnn", "--method", "mae-pretrain", "--train-items", "8", "--no-progress",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "pre-trains a vit_tiny encoder" in capsys.readouterr().err


def test_a_missing_init_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", *COMMON, "--init", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "missing.safetensors: no such file" in capsys.readouterr().err


def test_pretraining_runs_on_the_gpu_when_there_is_one(tmp_path, capsys, monkeypatch):
    """models/cli.py passes the device it picks to the pre-training loop (checked without a GPU)."""
    import torch

    import robustgate.models.mimir as mimir

    captured = {}

    def fake_pretrain(model, loader, **kwargs):
        captured.update(kwargs)
        return mimir.PretrainResult()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mimir, "pretrain", fake_pretrain)
    assert main(["train", *COMMON, "--method", "mimir-pretrain", "--out", str(tmp_path / "pre")]) == 0
    assert str(captured["device"]) == "cuda"
    assert json.loads(capsys.readouterr().out)["device"] == "cuda"
    assert captured["sigma"] is None and captured["lr"] == 1.5e-4 * 32 / 256  # median heuristic, blr scaling
