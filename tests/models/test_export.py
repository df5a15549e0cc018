"""ONNX export parity, bundle round trip, the torch twin, and the shared tiny_bundle fixture."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from robustgate.models.archs import arch_names, build_arch
from robustgate.models.bundle import Bundle, BundleError
from robustgate.models.export import ExportError, export_onnx, write_bundle
from robustgate.models.twin import TorchClassifier, load_backbone


def test_tiny_bundle_is_trained_and_has_both_outputs(tiny_bundle, fmnist_subset):
    bundle = Bundle.load(tiny_bundle)
    assert bundle.spec.backbone.features_output == "features"
    assert bundle.spec.backbone.metrics["clean_accuracy"] > 0.6
    session = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)), providers=["CPUExecutionProvider"])
    x, y = fmnist_subset("test", 200)
    logits, feats = session.run(["logits", "features"], {"input": x.numpy()})
    assert logits.shape == (200, 10) and feats.shape == (200, 32)
    assert (feats >= 0).all(), "features are ReLU activations"
    assert (logits.argmax(1) == y.numpy()).mean() > 0.6


def test_twin_matches_onnx_and_classifier_protocol(tiny_bundle, fmnist_subset):
    bundle = Bundle.load(tiny_bundle)
    module = load_backbone(bundle)
    assert not module.training
    x, _ = fmnist_subset("val", 33)
    session = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)), providers=["CPUExecutionProvider"])
    logits, feats = session.run(["logits", "features"], {"input": x.numpy()})
    clf = TorchClassifier(module)
    with torch.no_grad():
        np.testing.assert_allclose(clf.logits(x).numpy(), logits, atol=1e-4)
        np.testing.assert_allclose(clf.features(x).numpy(), feats, atol=1e-4)
    # the twin is differentiable w.r.t. the input
    xg = x.clone().requires_grad_(True)
    clf.logits(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_load_backbone_accepts_a_path(tiny_bundle):
    module = load_backbone(tiny_bundle)
    assert module(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("cnn", {"width": 4, "hidden": 8}, (1, 28, 28)),
    ("preact_resnet18", {"width": 4}, (3, 32, 32)),
    ("vit_tiny", {"dim": 16, "depth": 1, "heads": 2}, (1, 28, 28)),
])
def test_every_arch_exports_with_parity(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    module = build_arch(name, **kwargs).eval()
    diffs = export_onnx(module, tmp_path / "m.onnx", shape, features=True)
    assert set(diffs) == {"logits", "features"} and max(diffs.values()) <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # dynamic batch axis
        x = torch.rand(n, *shape)
        logits, feats = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, module(x).numpy(), atol=1e-4)
            np.testing.assert_allclose(feats, module.features(x).numpy(), atol=1e-4)


def test_registry_knows_the_three_archs():
    assert {"cnn", "preact_resnet18", "vit_tiny"} <= set(arch_names())
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        build_arch("nope")
    with pytest.raises(ValueError, match="image_size must be divisible by 4"):
        build_arch("cnn", image_size=30)


def test_logits_only_export(tmp_path):
    module = build_arch("cnn", width=4, hidden=8).eval()
    export_onnx(module, tmp_path / "m.onnx", (1, 28, 28), features=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]


class _Sneaky(torch.nn.Module):
    """Differs between eval-mode torch and its trace: a python-side random offset per call."""

    def __init__(self):
        super().__init__()
        self.inner = build_arch("cnn", width=4, hidden=8)
        self.head = self.inner.head

    def features(self, x):
        return self.inner.features(x)

    def forward(self, x):
        return self.inner(x) + float(np.random.rand())


def test_parity_failure_raises(tmp_path):
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(_Sneaky().eval(), tmp_path / "m.onnx", (1, 28, 28), features=False)


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(1)
    module = build_arch("cnn", width=4, hidden=8).eval()
    bundle = write_bundle(
        tmp_path / "b", module, arch="cnn", arch_kwargs={"width": 4, "hidden": 8}, classes=[str(i) for i in range(10)],
        input_shape=(1, 28, 28), recipe={"method": "standard"}, metrics={"clean_accuracy": 0.1}, seed=3,
    )
    again = Bundle.load(tmp_path / "b")
    assert again.spec == bundle.spec
    assert again.spec.backbone.arch_kwargs == {"width": 4, "hidden": 8}
    assert again.spec.provenance["seed"] == 3
    assert again.input.mean == pytest.approx((0.2860,)) and again.input.std == pytest.approx((0.3530,))
    twin = load_backbone(again)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(twin(x), module(x))
    # bundle.yaml is plain YAML (safe_load), no python tags
    assert isinstance(yaml.safe_load((tmp_path / "b" / "bundle.yaml").read_text()), dict)
    # artifacts get the umask's permissions, not safetensors' 0600 (a non-root server must read them)
    umask = os.umask(0)
    os.umask(umask)
    for art in again.artifacts().values():
        assert stat.S_IMODE((tmp_path / "b" / art.path).stat().st_mode) == 0o666 & ~umask, art.path


def test_tampered_weights_refuse_to_load(tmp_path):
    module = build_arch("cnn", width=4, hidden=8).eval()
    write_bundle(tmp_path / "b", module, arch="cnn", arch_kwargs={"width": 4, "hidden": 8},
                 classes=[str(i) for i in range(10)], input_shape=(1, 28, 28))
    weights = tmp_path / "b" / "backbone.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for backbone.weights \(backbone.safetensors\).*refusing to load"):
        Bundle.load(tmp_path / "b")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_backbone(tmp_path / "b")


def test_unknown_schema_version_refuses_to_load(tmp_path):
    module = build_arch("cnn", width=4, hidden=8).eval()
    write_bundle(tmp_path / "b", module, arch="cnn", arch_kwargs={"width": 4, "hidden": 8},
                 classes=[str(i) for i in range(10)], input_shape=(1, 28, 28))
    manifest = tmp_path / "b" / "bundle.yaml"
    raw = yaml.safe_load(manifest.read_text())
    raw["schema_version"] = 99
    manifest.write_text(yaml.safe_dump(raw))
    with pytest.raises(BundleError, match="unknown bundle schema_version 99; this robustgate reads version 1"):
        Bundle.load(tmp_path / "b")


def test_wrong_arch_kwargs_refuse_to_build_twin(tmp_path):
    module = build_arch("cnn", width=4, hidden=8).eval()
    write_bundle(tmp_path / "b", module, arch="cnn", arch_kwargs={"width": 5, "hidden": 8},
                 classes=[str(i) for i in range(10)], input_shape=(1, 28, 28))
    with pytest.raises(BundleError, match="does not fit cnn"):
        load_backbone(tmp_path / "b")
