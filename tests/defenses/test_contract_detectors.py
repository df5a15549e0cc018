"""The contract every registered detector keeps (parametrized over the registry): score shape
[N], float, finite, deterministic; config round trip; save -> load gives identical scores; bad
input raises ValueError with a clear message. A new detector kind is picked up automatically;
give it small fitting settings in FAST_PARAMS if its defaults are slow."""

import pytest
import torch

from robustgate.defenses.base import Detector, FitData, build, registry

DETECTORS = sorted(k for k, cls in registry().items() if issubclass(cls, Detector))
FAST_PARAMS = {
    "magnet": {"epochs": 1, "width": 8},
    "safetynet": {"n_fit": 120, "steps": 3},
}


def test_builtin_detectors_registered():
    assert {"magnet", "safetynet"} <= set(DETECTORS)
    assert registry()["reformer"].role == "purifier"


@pytest.fixture(scope="module")
def fitted(request, detect_fit_data, tiny_classifier):
    cache = {}

    def get(kind):
        if kind not in cache:
            det = build(kind, **FAST_PARAMS.get(kind, {}))
            small = FitData(detect_fit_data.train_x[:600], detect_fit_data.train_y[:600],
                            detect_fit_data.val_x[:100], detect_fit_data.val_y[:100])
            det.fit(small, tiny_classifier)
            cache[kind] = det
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", DETECTORS)
def test_score_shape_dtype_finite_deterministic(kind, fitted, tiny_classifier, fmnist_subset):
    det = fitted(kind)
    x, _ = fmnist_subset("test", 16)
    with torch.no_grad():
        s1, s2 = det.score(x, tiny_classifier), det.score(x, tiny_classifier)
        one = det.score(x[:1], tiny_classifier)
    assert s1.shape == (16,) and s1.is_floating_point() and torch.isfinite(s1).all()
    assert torch.equal(s1, s2)
    assert one.shape == (1,) and torch.allclose(one, s1[:1], rtol=1e-4, atol=1e-6)  # batch-independent


@pytest.mark.parametrize("kind", DETECTORS)
def test_config_round_trip_and_reload(kind, fitted, tiny_classifier, fmnist_subset, tmp_path):
    det = fitted(kind)
    det_config = det.config()
    assert "threshold" in det_config
    clone = build(kind, **det_config)
    assert clone.config() == det_config
    files = det.save(tmp_path)
    assert files and all((tmp_path / rel).is_file() for rel in files.values())
    assert all(rel.endswith((".onnx", ".safetensors", ".json")) for rel in files.values())
    clone.load_artifacts({role: tmp_path / rel for role, rel in files.items()})
    x, _ = fmnist_subset("test", 16)
    with torch.no_grad():
        assert torch.equal(clone.score(x, tiny_classifier), det.score(x, tiny_classifier))
    with pytest.raises(ValueError, match="missing"):
        build(kind, **det_config).load_artifacts({})


@pytest.mark.parametrize("kind", DETECTORS)
@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(1, 28, 28), r"expected \[N, C, H, W\]"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN or Inf"),
        (torch.rand(2, 1, 28, 28) * 255, "outside the declared range"),
        (torch.randint(0, 2, (2, 1, 28, 28)), "floating-point"),
    ],
)
def test_bad_input_raises(kind, fitted, tiny_classifier, bad, match):
    with pytest.raises(ValueError, match=match):
        fitted(kind).score(bad, tiny_classifier)


@pytest.mark.parametrize("kind", DETECTORS)
def test_unfitted_detector_raises(kind, tiny_classifier):
    with pytest.raises(ValueError, match="not fitted"):
        build(kind).score(torch.rand(2, 1, 28, 28), tiny_classifier)


@pytest.mark.parametrize("kind", DETECTORS)
def test_threshold_semantics(kind):
    det = build(kind, threshold=0.5)
    assert det.is_adversarial(torch.tensor([0.4, 0.5, 0.6])).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="no threshold"):
        build(kind).is_adversarial(torch.tensor([1.0]))


# ---- every detector at every input shape (issue 21) -----------------------------------------------
# A tiny backbone made for each shape (conv, global average pool, a ReLU feature layer, a linear head) and
# smooth synthetic images stand in for the user's model and data: the contract is about shapes and
# runtimes, not detection quality (test_detect_*.py measure that on Fashion-MNIST).
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 224, 224)]
SHAPE_IDS = ["1x28x28", "3x32x32", "3x224x224"]
SHAPE_PARAMS = {
    "magnet": {"epochs": 1, "width": 8, "criterion": "l2"},  # arch auto, the default: II, IV at 224x224
    "safetynet": {"n_fit": 48, "steps": 2, "attacks": ["fgsm", "pgd"], "positives": "all"},
}


class TinyNet(torch.nn.Module):
    """``[N, C, H, W]`` -> logits ``[N, 3]``; ``features`` ``[N, 16]`` (late-stage ReLU units)."""

    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def shaped_images(n, shape, seed=0):
    """Smooth blobs ``[n, C, H, W]`` in [0, 1] with a tint per channel, and labels ``[n]`` in 0..2."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    d2 = (yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2  # [n, H, W]
    x = torch.exp(-d2 / 0.02)[:, None] * (0.4 + 0.5 * torch.rand(n, c, 1, 1, generator=g))
    return x.float(), torch.randint(0, 3, (n,), generator=g)


_SHAPED: dict[tuple, tuple] = {}


def shaped(kind, shape):
    """(detector fitted at ``shape``, its classifier) -- cached per kind and shape."""
    from robustgate.models.twin import TorchClassifier

    if (kind, shape) not in _SHAPED:
        clf = TorchClassifier(TinyNet(shape[0]).eval())
        x, y = shaped_images(64 if shape[-1] < 100 else 32, shape, seed=1)
        det = build(kind, **SHAPE_PARAMS[kind])
        det.fit(FitData(x, y, x[:8], y[:8]), clf)
        _SHAPED[kind, shape] = det, clf
    return _SHAPED[kind, shape]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", DETECTORS)
def test_detector_contract_at_every_shape(kind, shape, tmp_path):
    assert kind in SHAPE_PARAMS, f"add small fitting settings for {kind!r} to SHAPE_PARAMS"
    det, clf = shaped(kind, shape)
    x, _ = shaped_images(6, shape, seed=2)
    with torch.no_grad():
        s = det.score(x, clf)
        assert s.shape == (6,) and s.dtype == torch.float32 and torch.isfinite(s).all()
        assert torch.equal(det.score(x, clf), s)
        assert torch.allclose(det.score(x[:1], clf), s[:1], rtol=1e-4, atol=1e-5)
    files = det.save(tmp_path)
    for runtime in ("torch", "onnx"):
        again = build(kind, **{**det.config(), "runtime": runtime})
        again.load_artifacts({role: tmp_path / rel for role, rel in files.items()})
        with torch.no_grad():
            got = again.score(x, clf)
        assert torch.allclose(got, s, rtol=1e-4, atol=1e-4), (runtime, (got - s).abs().max())
    if kind == "magnet":  # its own network is sized to the fitted items (SafetyNet's is the classifier's)
        other = (3 if shape[0] == 1 else 1, *shape[1:])
        with pytest.raises(ValueError, match="the autoencoder was fitted on items"):
            det.score(shaped_images(2, other)[0], clf)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fused_magnet_score_graph_at_every_shape(shape, tmp_path):
    """MagNet's score graph (onnx_score_model) fused into a backbone's ONNX graph of that input shape
    (proxy/backends/fuse.py) answers the detector's own scores and the backbone's own logits."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from robustgate.defenses.runtime import export_onnx
    from robustgate.proxy.backends.fuse import fuse_score_graphs

    det, clf = shaped("magnet", shape)
    files = det.save(tmp_path / "ae")
    served = build("magnet", **{**det.config(), "runtime": "onnx"})
    served.load_artifacts({role: tmp_path / "ae" / rel for role, rel in files.items()})
    export_onnx(clf.module, torch.zeros(2, *shape), tmp_path / "backbone.onnx", output_name="logits")
    fused, outputs = fuse_score_graphs(onnx.load(str(tmp_path / "backbone.onnx")), {"magnet": served.onnx_score_model()})
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    x, _ = shaped_images(5, shape, seed=3)
    logits, score = session.run(["logits", outputs["magnet"]], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(score, det.score(x).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits, clf.logits(x).numpy(), rtol=1e-4, atol=1e-5)
