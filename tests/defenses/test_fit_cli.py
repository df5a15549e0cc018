"""`robustgate fit`: fits a defense into a copy of the tiny bundle, stores artifacts with sha256,
params, threshold and calibration record in bundle.yaml, and the result loads, verifies and
reproduces its calibration."""

import shutil

import pytest
import torch

from robustgate.defenses import calibration as cal
from robustgate.defenses.base import build
from robustgate.defenses.cli import fit_defense, load_splits, parse_params, score_batches
from robustgate.models.bundle import Bundle, BundleError
from robustgate.models.twin import TorchClassifier, load_backbone
from robustgate.proxy.cli import main

SMALL = ["--n-train", "600", "--n-val", "400", "--n-test", "400"]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_parse_params():
    assert parse_params(["criterion=l1", "epochs=2", "eps=[0.05, 0.1]", "gamma=scale"]) == {
        "criterion": "l1", "epochs": 2, "eps": [0.05, 0.1], "gamma": "scale"}
    with pytest.raises(ValueError, match="key=value"):
        parse_params(["epochs"])


def test_fit_magnet_cli_writes_a_verified_calibrated_bundle(bundle_copy, capsys):
    rc = main(["fit", "--bundle", str(bundle_copy), "--defense", "magnet", "--name", "magnet_l1",
               "--params", "criterion=l1", "arch=II", "width=8", "epochs=1", "--target-fpr", "0.05", *SMALL])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "target FPR 0.0500" in printed and "val FPR" in printed and "test FPR" in printed

    bundle = Bundle.load(bundle_copy)  # verifies every sha256, including the new artifacts
    spec = bundle.defense("magnet_l1")
    assert spec.kind == "magnet" and set(spec.files) == {"ae_onnx", "ae_weights"}
    assert spec.params["criterion"] == "l1" and spec.params["epochs"] == 1 and "threshold" not in spec.params
    c = spec.calibration
    assert c["target_fpr"] == 0.05 and c["n_val"] == 400 and c["n_test"] == 400
    assert c["threshold"] == spec.threshold and c["val_fpr"] <= 0.05
    assert abs(c["test_fpr"] - 0.05) <= cal.fpr_tolerance(0.05, 400, 400)
    assert {"q0.5", "q0.99", "min", "max"} <= set(c["quantiles"])

    # rebuilding from the bundle alone reproduces the calibration on the same validation items
    det = build(spec.kind, **spec.params)
    det.load_artifacts({role: bundle.path(art) for role, art in spec.files.items()})
    det.threshold = spec.threshold
    splits = load_splits(n_train=600, n_val=400, n_test=400)
    clf = TorchClassifier(load_backbone(bundle))
    val_scores = score_batches(det, splits["val"][0], clf)
    assert cal.fpr(val_scores, spec.threshold) == c["val_fpr"]
    assert cal.threshold_at_fpr(val_scores, 0.05) == spec.threshold

    # a tampered artifact is refused
    (bundle.root / spec.files["ae_onnx"].path).write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="checksum mismatch"):
        Bundle.load(bundle_copy)


def test_fit_purifier_has_no_threshold_and_keeps_other_defenses(bundle_copy):
    splits = load_splits(n_train=300, n_val=50, n_test=50)
    fit_defense(bundle_copy, "magnet", name="m", params={"epochs": 1, "width": 4}, splits=splits, log=lambda *_: None)
    spec = fit_defense(bundle_copy, "reformer", params={"epochs": 1, "width": 4}, splits=splits, log=lambda *_: None)
    assert spec["threshold"] is None and spec["calibration"]["fit"]["n_train"] == 300
    bundle = Bundle.load(bundle_copy)
    assert set(bundle.spec.defenses) == {"m", "reformer"}


def test_fit_errors_are_clear(bundle_copy):
    splits = load_splits(n_train=50, n_val=20, n_test=20)
    with pytest.raises(ValueError, match="unknown defense kind 'nope'"):
        fit_defense(bundle_copy, "nope", splits=splits)
    with pytest.raises(ValueError, match="criterion must be one of"):
        fit_defense(bundle_copy, "magnet", params={"criterion": "l7"}, splits=splits)
    bad = {k: (x[:, :, :14, :14].contiguous(), y) for k, (x, y) in splits.items()}
    with pytest.raises(ValueError, match="the bundle expects"):
        fit_defense(bundle_copy, "magnet", splits=bad)
    with pytest.raises(BundleError, match="no bundle.yaml"):
        fit_defense(bundle_copy / "nowhere", "magnet", splits=splits)
