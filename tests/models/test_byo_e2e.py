"""Bring your own classifier, end to end (issue 21, docs/BYO.md; examples/byo.sh at full size):
a tiny RGB classifier written and trained here in plain torch on a small generated ImageFolder,
exported to ONNX and served by a real MLServer -> ``robustgate import`` -> ``robustgate fit``
MagNet and a small diffusion UNet on that ImageFolder -> a real proxy on loopback in front of the
MLServer -> tritonclient -> ``robustgate eval`` (FGSM and Square on a few images).

The data: 3 classes of 3x16x16 images, class k a noisy blob bright in its colour's channel over a random
dark background, so the model learns something in a few steps (its clean accuracy is asserted).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import yaml
from PIL import Image
from torch import nn

import harness  # tests/proxy/upstream (pytest pythonpath)
from loopback import LoopbackProxy  # tests/helpers
from robustgate.models.bundle import Bundle, sha256_file
from robustgate.models.twin import has_twin
from robustgate.proxy.cli import main as cli

pytestmark = pytest.mark.slow  # trains, fits two defenses, starts MLServer and runs an evaluation
SHAPE = (3, 16, 16)
CLASSES = ["blue", "green", "red"]  # sorted, as ImageFolder numbers them
CHANNEL = {"blue": 2, "green": 1, "red": 0}


class Tiny(nn.Module):
    """[N, 3, 16, 16] -> logits [N, 3]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),  # [N, 8, 8, 8]
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),  # [N, 16, 4, 4]
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # [N, 16]
        self.head = nn.Linear(16, len(CLASSES))

    def forward(self, x):
        return self.head(self.body(x))


def sample(k: int, rng: np.random.Generator) -> np.ndarray:
    """One ``[16, 16, 3]`` uint8 image of class ``k``."""
    img = rng.uniform(0.0, 0.35, size=3) + rng.normal(0.0, 0.05, size=(16, 16, 3))
    cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 6)
    yy, xx = np.mgrid[:16, :16]
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)[..., None]
    colour = rng.uniform(0.2, 0.45, size=3)
    colour[CHANNEL[CLASSES[k]]] = rng.uniform(0.8, 1.0)
    img = np.where(blob, colour, img)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's side: ImageFolder (train 60/class, test 20/class), a trained model, its ONNX."""
    root = tmp_path_factory.mktemp("byo")
    rng = np.random.default_rng(0)
    data = root / "data"
    xs, ys = [], []
    for part, n in (("train", 60), ("test", 20)):
        for k, name in enumerate(CLASSES):
            (data / part / name).mkdir(parents=True)
            for i in range(n):
                img = sample(k, rng)
                Image.fromarray(img).save(data / part / name / f"{i:03d}.png")
                if part == "train":
                    xs.append(img.transpose(2, 0, 1) / 255.0)
                    ys.append(k)
    x = torch.tensor(np.stack(xs), dtype=torch.float32)  # [180, 3, 16, 16]
    y = torch.tensor(ys)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = Tiny()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):  # full-batch standard training
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    onnx_file = root / "user" / "model.onnx"
    onnx_file.parent.mkdir()
    torch.onnx.export(net, (x[:2],), str(onnx_file), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    (onnx_file.parent / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"root": root, "data": data, "onnx": onnx_file, "classes": onnx_file.parent / "classes.txt"}


def test_import_fit_serve_in_front_of_mlserver_and_eval(user, tmp_path):
    data = ["--dataset", "imagefolder", "--data-dir", str(user["data"])]
    out = tmp_path / "bundle"
    # import: the signature from the graph, the twin checked against ONNX Runtime on the test split
    assert cli(["import", "--onnx", str(user["onnx"]), "--out", str(out), "--name", "tiny",
                "--classes", str(user["classes"]), *data]) == 0
    bundle = Bundle.load(out)  # every checksum verified
    assert bundle.classes == CLASSES and tuple(bundle.input.shape) == SHAPE and has_twin(bundle)
    assert sha256_file(out / "backbone.onnx") == sha256_file(user["onnx"]) == bundle.spec.backbone.onnx.sha256
    parity = bundle.spec.backbone.twin_parity
    assert parity["items"] == 60 and "imagefolder" in parity["inputs"].lower()  # 60 test images < 64
    assert parity["argmax_agreement"] == 1.0
    assert all(d <= parity["atol"][k] for k, d in parity["max_abs_diff"].items())

    # fit: MagNet and a small diffusion UNet on the user's data
    assert cli(["fit", "--bundle", str(out), "--defense", "magnet", "--n-train", "150", "--n-val", "30",
                "--n-test", "60", "--params", "epochs=3", "width=8", "--target-fpr", "0.05", "--no-progress",
                *data]) == 0
    assert cli(["fit", "--bundle", str(out), "--defense", "diffusion", "--n-train", "150", "--n-val", "10",
                "--n-test", "10", "--params", "train_steps=20", "block_out_channels=[8,16]", "batch_size=16",
                "--no-progress", *data]) == 0
    bundle = Bundle.load(out)  # the fitted artifacts' checksums too
    magnet, diffusion = bundle.spec.defenses["magnet"], bundle.spec.defenses["diffusion"]
    assert magnet.threshold is not None and np.isfinite(magnet.threshold)
    # validation is the 10% of the ImageFolder train part held out by the data layer: 18 of 180 (< --n-val 30)
    assert magnet.calibration["target_fpr"] == 0.05 and magnet.calibration["n_val"] == 18
    assert magnet.calibration["n_test"] == 60 and 0.0 <= magnet.calibration["test_fpr"] <= 1.0
    assert diffusion.params["channels"] == 3 and diffusion.params["sample_size"] == 16
    for spec in (magnet, diffusion):
        assert spec.files
        for art in spec.files.values():
            assert sha256_file(out / art.path) == art.sha256

    # serve: the proxy in front of a real MLServer serving the same ONNX file
    test = sorted((user["data"] / "test").rglob("*.png"))
    x = np.stack([np.asarray(Image.open(p), dtype=np.float32).transpose(2, 0, 1) / 255.0 for p in test])  # [60, 3, 16, 16]
    y = np.array([CLASSES.index(p.parent.name) for p in test])
    server = harness.MLServerProcess(tmp_path / "mlserver", {"tiny": {"onnx": out / "backbone.onnx"}})
    server.start()
    try:
        direct = harness.infer_direct(server.url, "tiny", x)["logits"]  # [60, 3]
        upstream = {"backend": {"kind": "upstream", "upstream": {"url": server.url}}}
        proxy = LoopbackProxy(out, {"stages": [{"name": "magnet", "kind": "magnet", "action": "reject"}],
                                    "verdict_mode": "item"},
                              {**upstream, "server": {"explain": True}})  # explain: the detector scores answered
        try:
            with tc.InferenceServerClient(proxy.url) as client:
                inp = tc.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                result = client.infer("tiny", [inp])
        finally:
            proxy.stop()
        logits, verdict = result.as_numpy("logits"), result.as_numpy("robustgate_verdict")
        score = result.as_numpy("robustgate_score_magnet")
        accepted = verdict == 0
        assert accepted.sum() >= 50  # calibrated at 5% FPR on held-out data: most clean images pass
        np.testing.assert_array_equal(verdict[~accepted], 2)
        assert (score[~accepted] > magnet.threshold).all() and (score[accepted] <= magnet.threshold).all()
        np.testing.assert_allclose(logits[accepted], direct[accepted], rtol=1e-5, atol=1e-6)
        assert np.isnan(logits[~accepted]).all()
        assert (direct.argmax(1) == y).mean() >= 0.9  # the user's model learned the data
        purified = LoopbackProxy(out, {"stages": [{"name": "diffusion", "kind": "diffusion"}], "seed": 0}, upstream)
        try:
            with tc.InferenceServerClient(purified.url) as client:
                result = client.infer("tiny", [inp])
        finally:
            purified.stop()
        assert result.as_numpy("logits").shape == (60, 3) and np.isfinite(result.as_numpy("logits")).all()
        np.testing.assert_array_equal(result.as_numpy("robustgate_verdict"), 0)
    finally:
        server.stop()

    # eval: FGSM (gradient through the twin) and Square (queries only) on a few images
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"configs": {
        "magnet": {"stages": [{"name": "magnet", "kind": "magnet", "action": "reject"}]},
        "diffusion": {"stages": [{"name": "diffusion", "kind": "diffusion"}]}}}))
    report = tmp_path / "eval"
    assert cli(["eval", "--bundle", str(out), "--pipeline", str(pipeline), "--attacks", "fgsm,square", "--eps", "0.1",
                "--n", "6", "--queries", "20", "--batch-size", "6", "--no-progress", "--surface-points", "1",
                "--out", str(report), *data]) == 0
    result = json.loads((report / "results.json").read_text())
    assert (report / "results.md").is_file()
    assert set(result["configs"]) == {"none", "magnet", "diffusion"}
    assert result["configs"]["magnet"]["detectors"]["magnet"]["threshold"] == pytest.approx(magnet.threshold)
    for config in ("none", "magnet", "diffusion"):
        clean = result["configs"][config]["clean"]
        assert 0.0 <= clean["clean_accuracy"] <= 1.0 and 0.0 <= clean["false_rejection_rate"] <= 1.0
        for attack in ("fgsm", "square"):
            cell = [c for c in result["cells"] if c["config"] == config and c["attack"] == attack]
            assert len(cell) == 1 and cell[0]["status"] == "done", cell
            assert cell[0]["eps"] == 0.1 and cell[0]["threat_model"]["n"] == 6
            m = cell[0]["metrics"]
            # robust = attacked items rejected, or accepted and correct (docs/EVALUATION.md)
            assert m["robust_accuracy"] == pytest.approx(m["rejection_rate"] + m["accepted_and_correct"], abs=1e-6)
            if config == "none":  # nothing rejects, and an attack never adds correct answers to a fixed model
                assert m["rejection_rate"] == 0.0 and m["robust_accuracy"] <= clean["clean_accuracy"] + 1e-9
    assert result["configs"]["none"]["clean"]["false_rejection_rate"] == 0.0
    assert result["configs"]["none"]["clean"]["clean_accuracy"] == pytest.approx(
        float((direct[:6].argmax(1) == y_eval(user["data"], 6)).mean()))


def y_eval(data: Path, n: int) -> np.ndarray:
    """Labels of the first ``n`` test items in the order robustgate's data layer reads them
    (torchvision ImageFolder: classes sorted, then files sorted)."""
    classes = sorted(p.name for p in (data / "test").iterdir())
    paths = sorted((data / "test").rglob("*.png"), key=lambda p: (classes.index(p.parent.name), p.name))
    return np.array([CLASSES.index(p.parent.name) for p in paths[:n]])


def test_import_refuses_the_datasets_classes_in_another_order(user, tmp_path, capsys):
    """ImageFolder numbers classes by sorted folder name; a class file listing the same names in
    another order would make every accuracy fit/eval/probe report wrong: refused, nothing written."""
    wrong = tmp_path / "classes.txt"
    wrong.write_text("red\ngreen\nblue\n")
    out = tmp_path / "b"
    assert cli(["import", "--onnx", str(user["onnx"]), "--out", str(out), "--classes", str(wrong),
                "--dataset", "imagefolder", "--data-dir", str(user["data"])]) == 2
    assert "in another order" in capsys.readouterr().err and not out.exists()


def test_torchvision_resnet_from_the_torchscript_exporter_gets_a_twin(tmp_path):
    """torch's TorchScript exporter folds BatchNorm into the convs and writes an ``Identity`` where two
    folded biases are equal; the twin inlines those (models/twin.py) instead of giving up."""
    import onnx
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "r18.onnx"
    torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    assert any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)  # what the rewrite is for
    assert cli(["import", "--onnx", str(path), "--out", str(tmp_path / "b")]) == 0
    bb = Bundle.load(tmp_path / "b").spec.backbone
    assert bb.twin == "onnx", bb.twin_note
    assert bb.twin_parity["argmax_agreement"] == 1.0
    assert bb.twin_parity["max_abs_diff"]["logits"] <= bb.twin_parity["atol"]["logits"]
