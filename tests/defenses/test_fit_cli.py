"""`robustgate fit`: fits a defense into a copy of the tiny bundle, stores artifacts with sha256,
params, threshold and calibration record in bundle.yaml, and the result loads, verifies and
reproduces its calibration."""

import re
import shutil
from pathlib import Path

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
    with pytest.raises(ValueError, match="--params: cannot build defense 'magnet': .*unexpected keyword argument"):
        fit_defense(bundle_copy, "magnet", params={"bogus": 1}, splits=splits)


@pytest.mark.parametrize("args, message", [
    (["--bundle", "{bundle}/nowhere", "--defense", "magnet"], "no bundle.yaml"),
    (["--bundle", "{bundle}", "--defense", "stateful", "--params", "method=knn", "bogus=1"],
     "--params: cannot build defense 'stateful': .*unexpected keyword argument 'bogus'"),
    (["--bundle", "{bundle}", "--defense", "stateful", "--params", "method=knn", "max_side=0"],
     "max_side must be a positive integer, got 0"),
    (["--bundle", "{bundle}", "--defense", "magnet", "--params", "epochs"], "--params expects key=value"),
])
def test_the_fit_command_answers_bad_input_with_one_line_and_status_2(bundle_copy, capsys, args, message):
    rc = main(["fit", *[a.format(bundle=bundle_copy) for a in args], *SMALL, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("robustgate fit: error: ") and re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: --device cuda is valid here")
def test_fit_device_cuda_without_a_device_is_refused(bundle_copy, capsys):
    rc = main(["fit", "--bundle", str(bundle_copy), "--defense", "magnet", "--device", "cuda", *SMALL, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "robustgate fit: error: device is 'cuda' but torch sees no CUDA device" in err


def test_fit_records_the_device_it_trained_on(bundle_copy):
    splits = load_splits(n_train=64, n_val=16, n_test=16)
    fit_defense(bundle_copy, "reformer", params={"epochs": 1, "width": 4}, splits=splits, log=lambda *_: None,
                device="cpu")
    assert Bundle.load(bundle_copy).spec.defenses["reformer"].calibration["fit"]["device"] == "cpu"


# every defense that trains a network, on the GPU (bench/gpu/check.sh runs these there): trained on the device,
# handed back, saved and calibrated on the CPU, and served from the bundle
CUDA_FITS = [
    ("magnet", {"criterion": "l1", "arch": "II", "width": 8, "epochs": 1}),
    ("reformer", {"epochs": 1, "width": 8}),
    ("stateful", {"method": "knn", "k": 2, "dim": 8, "width": 4, "steps": 20, "batch_size": 16}),
    ("diffusion", {"block_out_channels": [8, 16], "train_steps": 4, "batch_size": 8, "t_star": 80, "steps": 2}),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu/check.sh runs it on one)")
@pytest.mark.parametrize("kind, params", CUDA_FITS, ids=[k for k, _ in CUDA_FITS])
def test_fit_on_cuda_trains_there_and_the_bundle_serves_on_the_cpu(bundle_copy, kind, params):
    from robustgate.defenses.base import build_from_bundle

    splits = load_splits(n_train=256, n_val=200, n_test=100)
    spec = fit_defense(bundle_copy, kind, params=params, splits=splits, log=lambda *_: None, device="cuda",
                       target_fpr=0.05)
    bundle = Bundle.load(bundle_copy)  # verifies the artifacts written from the device-trained weights
    assert bundle.spec.defenses[kind].calibration["fit"]["device"] == "cuda"
    store = {}
    if kind == "stateful":
        from robustgate.defenses.stateful.knn_store import KnnMemoryStore

        store = {"store": KnnMemoryStore(max_entries=16, max_per_client=16)}
    defense = build_from_bundle(kind, kind, store, spec["threshold"], bundle, where="test")
    x = splits["test"][0][:4]
    if kind == "stateful":
        assert defense.observe("a", x).shape == (4,)
    elif kind == "magnet":
        assert torch.isfinite(defense.score(x)).all()
    else:
        assert defense.purify(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_fit_help_shows_defaults_and_the_shipped_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.replace("\\\n", " ").split())  # the epilog's commands: one line each
    assert "--no-progress" in text and "--dataset" in text and "--data-dir" in text
    assert "clean false-positive rate of detectors (default: 0.01)" in text
    assert "scoring batch size (default: 500)" in text
    # the epilog gives the commands the shipped bundle's defenses were fitted with (its bundle.yaml)
    shipped = Bundle.load(Path(__file__).resolve().parents[2] / "bundles" / "default").spec.defenses["magnet_l1"]
    p = shipped.params
    assert (f"--defense magnet --name magnet_l1 --n-train {shipped.calibration['fit']['n_train']} "
            f"--params criterion={p['criterion']} arch={p['arch']} width={p['width']} epochs={p['epochs']} lr={p['lr']}") in text


@pytest.mark.parametrize("progress", [True, False])
def test_fit_shows_progress_unless_told_not_to(bundle_copy, capsys, progress):
    """Issue 23: tqdm bars over the autoencoder's epochs (with the loss) and over the scoring
    passes, on stderr; --no-progress silences them and leaves stdout's summary lines as they were."""
    argv = ["fit", "--bundle", str(bundle_copy), "--defense", "magnet", "--params", "epochs=2", "width=4",
            "--n-train", "300", "--n-val", "100", "--n-test", "100", "--batch-size", "50"]
    assert main(argv + ([] if progress else ["--no-progress"])) == 0
    out, err = capsys.readouterr()
    assert "calibrated magnet" in out
    if progress:
        assert "magnet autoencoder II" in err and "epoch=2/2" in err and "loss=" in err
        assert "magnet: scoring validation" in err and "magnet: scoring test" in err
    else:
        assert "autoencoder" not in err and "scoring" not in err


def test_fit_refuses_safetynet_on_a_bundle_without_a_feature_output(bundle_copy):
    import yaml

    spec = yaml.safe_load((bundle_copy / "bundle.yaml").read_text())
    spec["backbone"]["features_output"] = None
    (bundle_copy / "bundle.yaml").write_text(yaml.safe_dump(spec))
    splits = load_splits(n_train=50, n_val=20, n_test=20)
    before = (bundle_copy / "bundle.yaml").read_bytes()
    with pytest.raises(ValueError, match="'safetynet' reads the backbone's late-stage activations, but bundle .* "
                                         "names no feature output .*--features-output NAME"):
        fit_defense(bundle_copy, "safetynet", splits=splits)
    assert (bundle_copy / "bundle.yaml").read_bytes() == before and not (bundle_copy / "defenses" / "safetynet").exists()


def test_fit_on_an_rgb_bundle_and_its_imagefolder(tmp_path):
    """Issue 21: `robustgate fit` on a 3x32x32 model and its ImageFolder (read through the data
    layer, conformed to the bundle's input shape): MagNet, SafetyNet and the diffusion UNet are sized
    to RGB 32x32, written, verified, and rebuilt from the bundle by the assembly in both runtimes."""
    from PIL import Image

    from robustgate.defenses.base import build_from_bundle
    from robustgate.models.archs import build_arch
    from robustgate.models.export import write_bundle

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "folder"
    for part, n in (("train", 40), ("test", 12)):
        for k, cls in enumerate(("warm", "cold")):
            (data / part / cls).mkdir(parents=True)
            for i in range(n):
                arr = torch.rand(36, 36, 3, generator=g) * 0.5
                arr[..., 0 if k == 0 else 2] += 0.5  # a red or a blue tint; 36x36: conformed to 32x32
                Image.fromarray((arr * 255).to(torch.uint8).numpy()).save(data / part / cls / f"{i}.png")
    kwargs = {"in_channels": 3, "num_classes": 2, "image_size": 32, "width": 4, "hidden": 16,
              "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    torch.manual_seed(0)
    bundle_dir = tmp_path / "rgb"
    write_bundle(bundle_dir, build_arch("cnn", **kwargs), arch="cnn", arch_kwargs=kwargs, classes=["warm", "cold"],
                 input_shape=(3, 32, 32), recipe={"dataset": "imagefolder", "data_dir": str(data), "val_size": 16, "seed": 0})
    common = ["--bundle", str(bundle_dir), "--target-fpr", "0.25", "--no-progress"]
    assert main(["fit", *common, "--defense", "magnet", "--params", "epochs=1", "width=4", "arch=I"]) == 0
    assert main(["fit", *common, "--defense", "safetynet", "--params", "n_fit=24", "steps=2", "attacks=[fgsm]",
                 "positives=all"]) == 0
    assert main(["fit", *common, "--defense", "diffusion", "--params", "block_out_channels=[8, 16]",
                 "train_steps=2", "batch_size=4", "t_star=20", "steps=1"]) == 0
    bundle = Bundle.load(bundle_dir)
    assert bundle.defense("magnet").calibration["fit"]["n_train"] == 64  # 80 training images less 16 for validation
    assert bundle.defense("diffusion").params["channels"] == 3 and bundle.defense("diffusion").params["sample_size"] == 32
    x = torch.rand(3, 3, 32, 32, generator=g)
    clf = TorchClassifier(load_backbone(bundle))
    for runtime in ("torch", "onnx"):
        for kind in ("magnet", "safetynet"):
            det = build_from_bundle(kind, kind, {}, None, bundle, where=kind, runtime=runtime)
            assert det.score(x, clf).shape == (3,) and det.threshold is not None
        pur = build_from_bundle("diffusion", "diffusion", {}, None, bundle, where="diffusion", runtime=runtime)
        with torch.no_grad():
            assert pur.purify(x, torch.Generator().manual_seed(0)).shape == (3, 3, 32, 32)
