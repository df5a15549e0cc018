"""SafetyNet (Lu et al. 2017) on the tiny bundle: quantizer and SVM math, ONNX (skl2onnx) vs
scikit-learn vs torch parity, bit-identical reload, straight-through gradient."""

import pytest
import torch

from robustgate.defenses import calibration as cal
from robustgate.defenses.base import build
from robustgate.defenses.detect.safetynet import fit_quantizer, quantize, rbf_decision


def test_quantizer_levels():
    acts = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 0.0], [4.0, 5.0]])  # [N=5, D=2]
    t2 = fit_quantizer(acts, 2)
    assert t2.tolist() == [[0.0, 0.0]]
    assert quantize(acts, t2).tolist() == [[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    t3 = fit_quantizer(acts, 3)  # 0 and the median of each unit's positive activations
    assert t3.tolist() == [[0.0, 0.0], [2.5, 2.5]]
    assert quantize(acts, t3)[:, 0].tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    dead = fit_quantizer(torch.zeros(4, 1), 3)
    assert dead[1, 0] == float("inf") and quantize(torch.ones(1, 1), dead).item() == 0.5


def test_quantize_straight_through_gradient():
    acts = torch.tensor([[0.01, 2.0]], requires_grad=True)
    z = quantize(acts, torch.zeros(1, 2))
    assert z.tolist() == [[1.0, 1.0]]  # forward: the hard code
    z.sum().backward()
    assert acts.grad[0, 0] > acts.grad[0, 1] > -1e-12  # backward: sigmoid slope, largest near the step


def test_rbf_decision_matches_formula():
    z, sv = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = rbf_decision(z, sv, torch.tensor([0.5, -1.0]), torch.tensor([0.25]), torch.tensor([0.5]))
    want = 0.5 * torch.exp(torch.tensor(-0.5)) - torch.exp(torch.tensor(-2.0)) + 0.25
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_positives_all_keeps_every_attacked_image(detect_fit_data, tiny_classifier):
    det = build("safetynet", levels=2, attacks=["fgsm"], eps=[0.05], n_fit=40, positives="all", seed=1)
    det.fit(detect_fit_data, tiny_classifier)
    assert det.fit_report["n_adv"] == det.fit_report["n_clean"] == 20
    assert det.fit_report["attacks"]["fgsm@0.05"]["fooled"] < 1.0  # so "fooling" would have kept fewer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"levels": 1}, "levels must be an integer >= 2"),
        ({"attacks": ["fgsm", "boom"]}, "attacks must be a non-empty subset"),
        ({"eps": [0.1, 2.0]}, r"eps must be a non-empty list of values in \(0, 1\)"),
        ({"gamma": -1.0}, "gamma must be 'scale' or a positive number"),
        ({"runtime": "sklearn"}, "runtime must be one of torch, onnx"),
        ({"positives": "some"}, "positives must be one of fooling, all"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build("safetynet", **kwargs)


def test_fit_report_and_needs_classifier(fitted_safetynet, detect_fit_data):
    rep = fitted_safetynet.fit_report
    assert {"fgsm@0.1", "pgd@0.1", "deepfool"} <= set(rep["attacks"])
    assert rep["n_clean"] == 150 and rep["positives"] == "fooling"
    assert rep["attacks"]["pgd@0.2"]["fooled"] > 0.5  # the attacks did produce adversarials
    # only the adversarials that fool the backbone are positives
    assert rep["n_adv"] == sum(round(a["n"] * a["fooled"]) for a in rep["attacks"].values()) < 150
    with pytest.raises(ValueError, match="needs the torch classifier"):
        build("safetynet").fit(detect_fit_data, None)
    with pytest.raises(ValueError, match="needs the classifier"):
        fitted_safetynet.score(torch.rand(2, 1, 28, 28), None)


def test_onnx_sklearn_torch_parity_and_reload(fitted_safetynet, detect_test_set, tiny_classifier, tmp_path):
    x, _, adv = detect_test_set
    batch = torch.cat([x[:64], adv[:64]])
    files = fitted_safetynet.save(tmp_path)
    assert set(files) == {"svm_onnx", "svm_state"}
    with torch.no_grad():
        codes = fitted_safetynet.codes(batch, tiny_classifier)
        ref = torch.from_numpy(fitted_safetynet._svm.decision_function(codes.numpy())).float()
        torch_scores = fitted_safetynet.score(batch, tiny_classifier)
        out = {}
        for runtime in ("torch", "onnx"):
            det = build("safetynet", **{**fitted_safetynet.config(), "runtime": runtime})
            det.load_artifacts({k: tmp_path / v for k, v in files.items()})
            out[runtime] = det.score(batch, tiny_classifier)
    assert torch.allclose(torch_scores, ref, atol=1e-5)
    assert torch.equal(out["torch"], torch_scores)  # reload is bit-identical
    assert torch.allclose(out["onnx"], ref, atol=1e-4), (out["onnx"] - ref).abs().max()


def test_scores_separate_pgd_from_clean(fitted_safetynet, detect_test_set, tiny_classifier):
    x, _, adv = detect_test_set
    with torch.no_grad():
        clean, attacked = fitted_safetynet.score(x, tiny_classifier), fitted_safetynet.score(adv, tiny_classifier)
    assert cal.roc_auc(clean, attacked) > 0.6  # tiny 32-unit backbone, 300 fitting images: weak but real


def test_score_has_surrogate_gradient(fitted_safetynet, detect_test_set, tiny_classifier):
    z = detect_test_set[2][:8].clone().requires_grad_(True)
    s = fitted_safetynet.score(z, tiny_classifier)
    (g,) = torch.autograd.grad(s.sum(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert fitted_safetynet.differentiable is False  # the red team knows the gradient is BPDA


def test_serving_a_fitted_safetynet_needs_neither_torchattacks_nor_scikit_learn():
    """Issue 23: the registry and a fitted SafetyNet load and score without importing torchattacks
    (only fit makes adversarials) or scikit-learn (only fit trains the SVM)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = f"""
import sys, torch
from robustgate.defenses.base import build_from_bundle, registry
from robustgate.models.bundle import Bundle
from robustgate.proxy.backends.onnx import OnnxBackend, OnnxClassifier
bundle = Bundle.load({str(root / "bundles" / "default")!r})
assert "safetynet" in registry()
for runtime in ("onnx", "torch"):
    det = build_from_bundle("safetynet", "safetynet", {{}}, None, bundle, where="t", runtime=runtime)
    print(det.score(torch.rand(2, 1, 28, 28), OnnxClassifier(OnnxBackend(bundle))).shape)
print(sorted(m for m in ("torchattacks", "sklearn") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True).stdout
    assert out.split("\n")[-2] == "[]", out


def test_assembly_refuses_safetynet_when_the_bundle_names_no_feature_output(tiny_bundle):
    from robustgate.defenses.base import build_from_bundle
    from robustgate.models.bundle import Bundle

    tiny = Bundle.load(tiny_bundle)
    spec = tiny.spec.model_copy(update={"backbone": tiny.spec.backbone.model_copy(update={"features_output": None})})
    bundle = Bundle(tiny.root, spec)
    with pytest.raises(ValueError, match=r"^stage 'sn': 'safetynet' reads the backbone's late-stage activations, .*"
                                         r"backbone.features_output is unset"):
        build_from_bundle("safetynet", "sn", {}, None, bundle, where="stage 'sn'")
    # detectors that read no features are unaffected
    assert build_from_bundle("magnet", "m", {}, 1.0, None, where="x").kind == "magnet"
