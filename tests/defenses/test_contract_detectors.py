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
