"""MagNet (Meng & Chen 2017) on the tiny bundle: the detector separates PGD eps=0.1 adversarials
from clean test images, accepts clean test images at about the calibrated FPR, runs identically
in torch and ONNX Runtime, reloads bit-identically, and exposes gradients for adaptive attacks."""

import copy
import math

import pytest
import torch

from robustgate.defenses import calibration as cal
from robustgate.defenses.base import FitData, build
from robustgate.defenses.detect.magnet import autoencoder, jensen_shannon, reconstruction_error, resolve_arch, \
    resolve_downsample


def _reload(det, tmp_path, **overrides):
    files = det.save(tmp_path)
    new = build(det.kind, **{**det.config(), **overrides})
    new.load_artifacts({role: tmp_path / rel for role, rel in files.items()})
    return new


def test_jensen_shannon_values():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert jensen_shannon(a, a, 10.0).item() == pytest.approx(0.0, abs=1e-7)
    # two disjoint one-hot-like distributions: JSD -> ln 2
    big = torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]])
    assert jensen_shannon(*big, 1.0).item() == pytest.approx(math.log(2), abs=1e-6)
    # P = (0.5, 0.5), Q = (1, 0): JSD = 0.5*KL(P||M) + 0.5*KL(Q||M), M = (0.75, 0.25)
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[1000.0, 0.0]])
    want = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert jensen_shannon(p, q, 1.0).item() == pytest.approx(want, rel=1e-5)
    # higher temperature flattens both distributions: smaller divergence
    x, y = torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([[0.0, 3.0, 1.0]])
    assert jensen_shannon(x, y, 40.0) < jensen_shannon(x, y, 10.0) < jensen_shannon(x, y, 1.0)


def test_reconstruction_error_norms():
    x, r = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    r[0, 0, 0, 0], r[0, 0, 1, 1] = 0.3, 0.4
    assert reconstruction_error(x, r, 1).tolist() == pytest.approx([0.7, 0.0])
    assert reconstruction_error(x, r, 2).tolist() == pytest.approx([0.5, 0.0])


@pytest.mark.parametrize("arch", ["I", "II", "III", "IV"])
def test_autoencoders_keep_shape_and_range(arch):
    ae = autoencoder(arch, channels=1, width=3)
    y = ae(torch.rand(2, 1, 28, 28))
    assert y.shape == (2, 1, 28, 28) and 0 <= y.min() and y.max() <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"criterion": "l3"}, "criterion must be one of l1, l2, jsd"),
        ({"arch": "V"}, "arch must be one of I, II, III, IV or auto"),
        ({"temperature": 0}, "temperature must be positive"),
        ({"runtime": "tf"}, "runtime must be one of torch, onnx"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"noise": 1.5}, r"noise must lie in \[0, 1\)"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build("magnet", **kwargs)


@pytest.mark.parametrize("arch", ["I", "III", "IV"])
def test_odd_image_sides_are_padded_and_cropped(arch, tmp_path):
    """Issue 21: any H x W. (Arch III used to refuse odd sides at fit; the autoencoder now pads to
    what its down-sampling needs and crops back.)"""
    odd = torch.rand(8, 1, 27, 29)
    det = build("magnet", arch=arch, width=4, epochs=1)
    det.fit(FitData(odd, torch.zeros(8, dtype=torch.long), odd, None))
    with torch.no_grad():
        assert det.reconstruct(odd).shape == odd.shape
        want = det.score(odd)
    onnx = _reload(det, tmp_path, runtime="onnx")
    assert torch.allclose(onnx.score(odd), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, stages", [((1, 28, 28), 1), ((3, 32, 32), 1), ((3, 64, 64), 2), ((3, 224, 224), 4)])
def test_autoencoders_scale_with_the_input(shape, stages):
    """Down-sampling stages follow the resolution (bottleneck side near 14 px, the paper's 28 -> 14),
    the first and last layers the channels; arch II stays at full resolution."""
    assert resolve_downsample("I", "auto", shape) == resolve_downsample("III", "auto", shape) == stages
    assert resolve_downsample("II", "auto", shape) == 0
    assert resolve_arch("auto", shape) == ("IV" if shape[-1] == 224 else "II")  # II as before up to 64x64
    for arch in ("I", "III"):
        ae = autoencoder(arch, shape[0], 4, "relu", stages)
        pools = sum(isinstance(m, torch.nn.AvgPool2d) or (isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)) for m in ae)
        assert pools == stages, arch
        assert ae[0].in_channels == shape[0]
        with torch.no_grad():
            assert ae(torch.rand(1, *shape)).shape == (1, *shape)


@pytest.mark.parametrize("shape, stages, side", [((3, 224, 224), 2, 56), ((3, 112, 112), 1, 56), ((1, 96, 128), 1, 48)])
def test_autoencoder_iv_folds_large_images(shape, stages, side):
    """Arch IV (auto from 80 px a side): pixel-unshuffle to a side near 56, II's three convolutions
    there with at least as many filters as folded channels, pixel-shuffle back; padded and cropped."""
    assert resolve_downsample("IV", "auto", shape) == stages
    ae = autoencoder("IV", shape[0], 32, "relu", stages)
    folded = shape[0] * 4 ** stages
    convs = [m for m in ae if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(folded, max(32, folded)), (max(32, folded),) * 2,
                                                                (max(32, folded), folded)]
    seen = []
    hook = convs[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        out = ae(torch.rand(2, *shape))
    hook.remove()
    assert out.shape == (2, *shape) and 0 <= out.min() and out.max() <= 1
    assert min(seen[0]) == side


def test_recorded_arch_ii_at_224_loads_as_fitted(tmp_path):
    """A bundle fitted at 224x224 before ``arch: auto`` records ``arch: II`` (fit writes every
    parameter): it rebuilds II, not the new default IV."""
    x = torch.rand(4, 3, 224, 224)
    old = build("magnet", arch="II", width=4, epochs=1, batch_size=4)
    old.fit(FitData(x, torch.zeros(4, dtype=torch.long), x, None))
    again = _reload(old, tmp_path)
    assert again.config()["arch"] == "II" and not isinstance(again.ae[0], torch.nn.PixelUnshuffle)
    with torch.no_grad():
        assert torch.equal(again.score(x), old.score(x))
    with pytest.raises(ValueError, match="do not fit arch IV"):  # the same weights read as the new default
        _reload(old, tmp_path / "auto", arch="auto")


def test_shipped_default_bundle_loads_with_identical_scores():
    """Regression: the autoencoder sized to [1, 28, 28] is exactly the one bundles/default's MagNet was
    fitted with (same layers and state-dict keys): the shipped artifacts load and score as recorded
    before the architecture learned to scale (arch III, width 16), in torch and in ONNX Runtime."""
    from pathlib import Path

    from robustgate.defenses.base import build_from_bundle
    from robustgate.models.bundle import Bundle

    bundle = Bundle.load(Path(__file__).resolve().parents[2] / "bundles" / "default")
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = (0.9 * torch.exp(-((yy - 10) ** 2 + (xx - 16) ** 2) / 30.0))[None, None]
    x = torch.cat([torch.rand(4, 1, 28, 28, generator=g), blob * torch.tensor([1.0, 0.8, 0.6, 0.4])[:, None, None, None]])
    recorded = [82.66523742675781, 80.54940795898438, 79.72992706298828, 81.77644348144531,
                11.419928550720215, 11.601256370544434, 11.798602104187012, 11.021689414978027]
    for runtime in ("torch", "onnx"):
        det = build_from_bundle("magnet", "magnet_l1", {}, None, bundle, where="test", runtime=runtime)
        assert det.config()["downsample"] == "auto" and det.ae is not None
        with torch.no_grad():
            got = det.score(x).tolist()
        assert got == pytest.approx(recorded, rel=1e-6, abs=1e-4), runtime
        if runtime == "torch":
            assert got == recorded  # bit-identical: the very layers the artifacts were fitted with


def test_unfitted_and_missing_classifier_raise(fitted_magnet, fixed_images):
    with pytest.raises(ValueError, match="not fitted"):
        build("magnet").score(torch.rand(2, 1, 28, 28))
    jsd = copy.copy(fitted_magnet)
    jsd.criterion = "jsd"
    with pytest.raises(ValueError, match="needs the classifier"):
        jsd.score(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"fitted on items \(1, 28, 28\)"):
        fitted_magnet.score(torch.rand(2, 3, 28, 28))


def test_clean_accepted_pgd_detected(fitted_magnet, detect_fit_data, detect_test_set, tiny_classifier):
    x, y, adv = detect_test_set
    with torch.no_grad():
        fooled = (tiny_classifier.logits(adv).argmax(1) != y).float().mean().item()
        val = fitted_magnet.score(detect_fit_data.val_x)
        clean, attacked = fitted_magnet.score(x), fitted_magnet.score(adv)
    assert fooled > 0.8, f"PGD eps=0.1 should fool the tiny backbone, fooled only {fooled:.2f}"
    t = cal.threshold_at_fpr(val, 0.01)
    test_fpr = cal.fpr(clean, t)
    assert test_fpr <= 0.01 + cal.fpr_tolerance(0.01, len(val), len(clean)), test_fpr
    # a small autoencoder fitted in seconds; bench/results/detect.md has the full-size figures
    auc = cal.roc_auc(clean, attacked)
    assert auc > 0.85, f"MagNet L1 AUC clean vs PGD eps=0.1 is only {auc:.3f}"


def test_jsd_criterion_scores_and_detects(fitted_magnet, detect_test_set, tiny_classifier, tmp_path):
    x, _, adv = detect_test_set
    jsd = _reload(fitted_magnet, tmp_path, criterion="jsd", temperature=10.0)
    with torch.no_grad():
        clean, attacked = jsd.score(x, tiny_classifier), jsd.score(adv, tiny_classifier)
    assert clean.min() >= 0 and clean.max() <= math.log(2)
    assert cal.roc_auc(clean, attacked) > 0.6


@pytest.mark.parametrize("criterion", ["l1", "l2", "jsd"])
def test_onnx_runtime_matches_torch(fitted_magnet, detect_test_set, tiny_classifier, tmp_path, criterion):
    x, _, adv = detect_test_set
    batch = torch.cat([x[:32], adv[:32]])
    t = _reload(fitted_magnet, tmp_path, criterion=criterion, runtime="torch")
    o = _reload(fitted_magnet, tmp_path, criterion=criterion, runtime="onnx")
    with torch.no_grad():
        st, so = t.score(batch, tiny_classifier), o.score(batch, tiny_classifier)
    assert torch.allclose(st, so, rtol=1e-4, atol=1e-6), (st - so).abs().max()


def test_artifacts_reload_bit_identically(fitted_magnet, detect_test_set, tmp_path):
    x = detect_test_set[0][:64]
    with torch.no_grad():
        before = fitted_magnet.score(x)
        after = _reload(fitted_magnet, tmp_path / "a").score(x)
    assert torch.equal(before, after)
    # the files themselves are reproducible: save -> load -> save gives the same bytes
    reloaded = _reload(fitted_magnet, tmp_path / "b")
    reloaded._item_shape = fitted_magnet._item_shape
    reloaded.save(tmp_path / "c")
    assert (tmp_path / "b" / "ae.safetensors").read_bytes() == (tmp_path / "c" / "ae.safetensors").read_bytes()


def test_fit_is_deterministic_under_seed(detect_fit_data):
    small = FitData(detect_fit_data.train_x[:300], detect_fit_data.train_y[:300],
                    detect_fit_data.val_x[:10], detect_fit_data.val_y[:10])
    a, b = build("magnet", width=4, epochs=1, seed=3), build("magnet", width=4, epochs=1, seed=3)
    a.fit(small)
    b.fit(small)
    x = detect_fit_data.val_x[:8]
    assert torch.equal(a.score(x), b.score(x))


def test_score_is_differentiable_for_adaptive_attacks(fitted_magnet, detect_test_set, tiny_classifier, tmp_path):
    """An adaptive attacker can drive the score down by gradient descent (torch runtime)."""
    adv = detect_test_set[2][:16].clone()
    for criterion in ("l2", "jsd"):
        det = _reload(fitted_magnet, tmp_path / criterion, criterion=criterion)
        z = adv.clone().requires_grad_(True)
        s0 = det.score(z, tiny_classifier)
        (grad,) = torch.autograd.grad(s0.sum(), z)
        assert grad.abs().sum() > 0
        with torch.no_grad():
            s1 = det.score((adv - 1e-3 * grad.sign()).clamp(0, 1), tiny_classifier)
        assert s1.mean() < s0.mean().detach(), criterion


def test_reformer_purifies_and_round_trips(detect_fit_data, detect_test_set, tmp_path):
    ref = build("reformer", width=8, epochs=1, seed=0)
    ref.fit(FitData(detect_fit_data.train_x[:1000], detect_fit_data.train_y[:1000],
                    detect_fit_data.val_x[:10], detect_fit_data.val_y[:10]))
    x = detect_test_set[0][:32]
    with torch.no_grad():
        out = ref.purify(x)
        assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
        assert torch.equal(ref.bpda(x), out)
        files = ref.save(tmp_path)
        for runtime in ("torch", "onnx"):
            again = build("reformer", **{**ref.config(), "runtime": runtime})
            again.load_artifacts({k: tmp_path / v for k, v in files.items()})
            got = again.purify(x)
            assert torch.allclose(got, out, atol=1e-5) if runtime == "onnx" else torch.equal(got, out)
    with pytest.raises(ValueError, match="outside the declared range"):
        ref.purify(x * 255)


# ---- detection at the RGB shapes of issue 21 (arch auto: II at 32x32, IV at 224x224) ---------------
def _scenes(n: int, shape: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small generated RGB dataset: ``[n, C, H, W]`` in [0, 1], two smooth coloured blobs over a
    coloured background (label: whether the brighter blob is on the left), and labels ``[n]``."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = 0.3 * torch.rand(n, c, 1, 1, generator=g).expand(n, c, h, w).clone()  # background colour
    for _ in range(2):
        centre = torch.rand(n, 2, 1, 1, generator=g) * 0.6 + 0.2
        width = 0.01 + 0.03 * torch.rand(n, 1, 1, generator=g)
        blob = torch.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / width)  # [n, H, W]
        x = x + blob[:, None] * 0.6 * torch.rand(n, c, 1, 1, generator=g)
    y = (x[..., : w // 2].mean((1, 2, 3)) > x[..., w // 2:].mean((1, 2, 3))).long()
    return x.clamp(0, 1), y


@pytest.mark.parametrize("shape, arch", [((3, 32, 32), "II"), ((3, 224, 224), "IV")], ids=["3x32x32", "3x224x224"])
def test_default_detector_sees_pgd_at_rgb_shapes(shape, arch):
    """The default autoencoder (``arch: auto``) at 3x32x32 (II, as before) and at 3x224x224 (IV: the
    image folded to 56x56 before the convolutions, a small share of a ResNet-50's cost,
    bench/results/byo.magnet_cost.md) still tells PGD examples (L-inf eps 0.1, made on a small CNN)
    from clean images of a small generated dataset: fails if the cheaper autoencoder goes blind
    (bench/results/byo.magnet_detect.md measures it on the RGB ImageFolder stand-in)."""
    import torchattacks

    x, y = _scenes(256, shape, seed=0)
    test_x, test_y = _scenes(48, shape, seed=1)
    det = build("magnet", epochs=8, batch_size=16, seed=0)  # the default architecture; 128 steps of 16 images
    det.fit(FitData(x, y, test_x[:4], test_y[:4]))
    assert isinstance(det.ae[0], torch.nn.PixelUnshuffle) == (arch == "IV")
    torch.manual_seed(0)
    stride = shape[-1] // 32
    clf = torch.nn.Sequential(torch.nn.Conv2d(3, 8, stride + 2, stride=stride, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(128, 2)).eval()
    adv = torchattacks.PGD(clf, eps=0.1, alpha=0.02, steps=10, random_start=True)(test_x, test_y).detach()
    with torch.no_grad():
        clean, attacked = det.score(test_x), det.score(adv)
    auc = cal.roc_auc(clean, attacked)
    assert auc > 0.9, f"MagNet ({arch}) at {shape}: ROC AUC clean vs PGD eps 0.1 only {auc:.3f}"
