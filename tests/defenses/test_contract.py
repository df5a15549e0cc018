"""The contract every registered purifier and ensemble keeps (parametrized over the registry, at
every input shape of ``SHAPES``: grayscale 28x28, RGB 32x32 and RGB 224x224 -- issue 21):
shape, dtype and [0, 1] range kept; deterministic under a seeded generator; config round trip
(``build(kind, **d.config())`` -- plus its saved artifacts -- gives identical outputs); bad input
and bad constructor arguments raise ValueError with a matching message. Then numeric regression
checks on tiny fixed tensors.

A new purifier/ensemble kind is picked up automatically; it must get an entry in ``BAD_ARGS``
(and ``FAST_PARAMS`` / ``NEEDS_FIT`` if its defaults are slow or it must be fitted first).
Detectors have their own contract test (test_contract_detectors.py).
"""

import pytest
import torch

from robustgate.defenses.base import Ensemble, FitData, Purifier, build, registry

pytestmark = pytest.mark.filterwarnings("ignore:diffusion. purifying with an untrained UNet")

PURIFIERS = sorted(k for k, cls in registry().items() if issubclass(cls, Purifier))
ENSEMBLES = sorted(k for k, cls in registry().items() if issubclass(cls, Ensemble))
FAST_PARAMS = {
    "diffusion": {"block_out_channels": [8, 16], "t_star": 40, "steps": 2},
    "smoothing": {"n0": 4, "n": 16},
    "reformer": {"epochs": 1, "batch_size": 32, "width": 8},  # width 4 at 224x224: all ReLUs dead after one step
}
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 224, 224)]
SHAPE_IDS = ["1x28x28", "3x32x32", "3x224x224"]
NEEDS_FIT = {"reformer"}
BAD_ARGS = {
    "jpeg": [({"quality": 0}, r"quality must be an integer in \[1, 100\]"), ({"quality": 75.0}, "quality")],
    "noise": [({"sigma": -0.1}, "sigma must be a finite number >= 0"), ({"sigma": float("nan")}, "sigma")],
    "bitdepth": [({"bits": 0}, r"bits must be an integer in \[1, 8\]"), ({"bits": 9}, "bits")],
    "median": [({"kernel_size": 2}, "kernel_size must be an odd integer"), ({"kernel_size": 0}, "kernel_size")],
    "diffusion": [({"t_star": -1}, "t_star must be an integer"), ({"steps": 0}, "steps must be an integer >= 1"),
                  ({"train_t_max": 2000}, "train_t_max must be an integer")],
    "reformer": [({"arch": "Z"}, "arch must be one of"), ({"noise": 1.5}, r"noise must lie in \[0, 1\)")],
    "tte": [({"dataset": "nope"}, "unknown dataset"), ({"transforms": []}, "non-empty list"),
            ({"transforms": ["zoom"]}, "unknown transform part")],
    "smoothing": [({"sigma": -1.0}, "sigma must be a finite number > 0"), ({"alpha": 0.0}, "alpha must lie in"),
                  ({"n": 0}, "n must be an integer >= 1"), ({"mode": "x"}, "mode must be")],
}
BAD_INPUTS = [
    (torch.rand(1, 28, 28), r"expected \[N, C, H, W\]"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN or Inf"),
    (torch.rand(2, 1, 28, 28) + 1.5, "outside the declared range"),
    (torch.rand(2, 1, 28, 28) - 1.0, "outside the declared range"),
    (torch.randint(0, 2, (2, 1, 28, 28)), "floating-point"),
    ([[0.5]], "expected a torch.Tensor"),
]


def images(n=4, seed=0, shape=(1, 28, 28)):
    """Deterministic smooth images ``[n, C, H, W]`` in [0, 1] (blobs at random places, a different
    brightness per channel)."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * torch.tensor([h * 0.7, w * 0.7]) + torch.tensor([h * 0.15, w * 0.15])
    d2 = (yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2  # [n, H, W]
    blob = torch.exp(-d2 / (30.0 * h * w / 784))[:, None]  # [n, 1, H, W], the blob's size scales with the image
    tint = 0.5 + 0.4 * torch.rand(n, c, 1, 1, generator=g)  # [n, C, 1, 1]
    return (tint * blob).float()


_CACHE: dict[tuple, object] = {}


def make(kind, shape=(1, 28, 28)):
    """The defense at its FAST_PARAMS, fitted on synthetic images of ``shape`` when it needs
    fitting (cached per kind and shape)."""
    if (kind, shape) not in _CACHE:
        d = build(kind, **FAST_PARAMS.get(kind, {}))
        if kind in NEEDS_FIT:
            x = images(64 if shape[-1] < 100 else 16, seed=1, shape=shape)
            d.fit(FitData(x, torch.zeros(len(x), dtype=torch.long), x[:8], torch.zeros(8, dtype=torch.long)))
        _CACHE[kind, shape] = d
    return _CACHE[kind, shape]


def shapes(kinds):
    """``(kind, shape)`` parameters, the 224x224 ones marked slow for the kinds whose fitting or
    forward passes take more than a few seconds there."""
    slow = {"diffusion"}
    return [pytest.param(k, s, id=f"{k}-{i}", marks=[pytest.mark.slow] if k in slow and s[-1] == 224 else [])
            for k in kinds for s, i in zip(SHAPES, SHAPE_IDS)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_the_builtin_kinds_are_registered():
    assert {"jpeg", "noise", "bitdepth", "median", "diffusion"} <= set(PURIFIERS)
    assert {"tte", "smoothing"} <= set(ENSEMBLES)


@pytest.mark.parametrize("kind", PURIFIERS + ENSEMBLES)
def test_every_kind_has_bad_argument_cases(kind):
    assert kind in BAD_ARGS, f"add constructor cases for {kind!r} to BAD_ARGS"
    cls = registry()[kind]
    assert cls.randomized in (True, False) and cls.differentiable in (True, False)


# ---- purifiers ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, shape", shapes(PURIFIERS))
def test_purifier_keeps_shape_dtype_and_range(kind, shape):
    p, x = make(kind, shape), images(shape=shape)
    y = p.purify(x, gen())
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, images(shape=shape))  # the input is not modified in place
    one = p.purify(x[:1], gen())
    assert one.shape == (1, *shape)
    if shape[0] > 1 and kind not in ("noise", "diffusion"):
        # per channel: a grey input (equal channels) stays grey through every deterministic purifier
        # that treats the channels alike (JPEG's YCbCr keeps grey grey, up to 1/255 of rounding)
        grey = x[:, :1].expand_as(x).contiguous()
        out = p.purify(grey, gen())
        if kind != "reformer":  # a fitted autoencoder mixes channels by design
            assert (out - out[:, :1]).abs().max() <= 1 / 255 + 1e-6, kind


@pytest.mark.parametrize("kind, shape", shapes(PURIFIERS))
def test_purifier_is_deterministic_under_a_seeded_generator(kind, shape):
    p, x = make(kind, shape), images(shape=shape)
    assert torch.equal(p.purify(x, gen(7)), p.purify(x, gen(7)))
    if p.randomized:
        assert not torch.equal(p.purify(x, gen(7)), p.purify(x, gen(8)))
    else:
        assert torch.equal(p.purify(x, gen(7)), p.purify(x, None))


@pytest.mark.parametrize("kind, shape", shapes(PURIFIERS))
def test_purifier_config_round_trip(kind, shape, tmp_path):
    p, x = make(kind, shape), images(shape=shape)
    want = p.purify(x, gen(3))  # first: a purifier that builds its network on first use (diffusion) has one to save
    clone = build(kind, **p.config())
    assert clone.config() == p.config()
    files = p.save(tmp_path)
    if files:
        clone.load_artifacts({role: tmp_path / rel for role, rel in files.items()})
    assert torch.equal(clone.purify(x, gen(3)), want)


@pytest.mark.parametrize("kind, shape", shapes(PURIFIERS))
def test_purifier_gradient_or_bpda_surrogate(kind, shape):
    """Differentiable purifiers pass gradients; the others offer a differentiable ``bpda``."""
    p = make(kind, shape)
    x = images(2, shape=shape).requires_grad_(True)
    out = p.purify(x, gen()) if p.differentiable else p.bpda(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", PURIFIERS)
@pytest.mark.parametrize("bad,match", BAD_INPUTS)
def test_purifier_rejects_bad_input(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        make(kind).purify(bad, gen())


# ---- ensembles ------------------------------------------------------------------------------

def fake_logits(copies):
    """A fixed linear classifier on pixels, K = 10."""
    w = torch.randn(10, copies[0].numel(), generator=gen(11)) * 0.05 * (784 / copies[0].numel()) ** 0.5
    return copies.flatten(1) @ w.T  # [M, 10]


@pytest.mark.parametrize("kind, shape", shapes(ENSEMBLES))
def test_ensemble_expand_and_aggregate_shapes(kind, shape):
    e, x = make(kind, shape), images(3, shape=shape)
    copies = e.expand(x, gen())
    assert copies.shape == (3 * e.copies, *shape) and copies.dtype == x.dtype
    assert torch.isfinite(copies).all()
    r = e.aggregate(fake_logits(copies))
    assert r.probs.shape == (3, 10) and torch.allclose(r.probs.sum(1), torch.ones(3))
    assert (r.probs >= 0).all()
    assert r.abstain.shape == (3,) and r.abstain.dtype == torch.bool
    assert r.radius is None or (r.radius.shape == (3,) and r.radius.dtype == torch.float32)
    with pytest.raises(ValueError, match="logits"):
        e.aggregate(torch.zeros(3 * e.copies + 1, 10))


@pytest.mark.parametrize("kind, shape", shapes(ENSEMBLES))
def test_ensemble_is_deterministic_under_a_seeded_generator(kind, shape):
    e, x = make(kind, shape), images(2, shape=shape)
    assert torch.equal(e.expand(x, gen(7)), e.expand(x, gen(7)))
    if e.randomized:
        assert not torch.equal(e.expand(x, gen(7)), e.expand(x, gen(8)))
    else:
        assert torch.equal(e.expand(x, gen(7)), e.expand(x, None))


@pytest.mark.parametrize("kind, shape", shapes(ENSEMBLES))
def test_ensemble_config_round_trip(kind, shape):
    e, x = make(kind, shape), images(2, shape=shape)
    clone = build(kind, **e.config())
    assert clone.config() == e.config() and clone.copies == e.copies
    a, b = e.expand(x, gen(3)), clone.expand(x, gen(3))
    assert torch.equal(a, b)
    ra, rb = e.aggregate(fake_logits(a)), clone.aggregate(fake_logits(b))
    assert torch.equal(ra.probs, rb.probs) and torch.equal(ra.abstain, rb.abstain)


@pytest.mark.parametrize("kind", ENSEMBLES)
@pytest.mark.parametrize("bad,match", BAD_INPUTS)
def test_ensemble_rejects_bad_input(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        make(kind).expand(bad, gen())


@pytest.mark.parametrize("kind", PURIFIERS + ENSEMBLES)
def test_bad_constructor_arguments_raise(kind):
    for kwargs, match in BAD_ARGS[kind]:
        with pytest.raises(ValueError, match=match):
            build(kind, **kwargs)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown defense kind 'jpg'.*jpeg"):
        build("jpg")


# ---- numeric regression on tiny fixed tensors ------------------------------------------------

def test_regression_cheap_purifiers(fixed_images):
    x = fixed_images  # [4, 1, 8, 8]
    assert build("bitdepth", bits=2).purify(x).sum().item() == pytest.approx(102.0, abs=1e-4)  # 32 + 32 + 22 + 16 by hand
    assert build("median", kernel_size=3).purify(x).sum().item() == pytest.approx(REGRESSION["median_sum"], abs=1e-4)
    jpeg = build("jpeg", quality=50).purify(x)
    assert jpeg.sum().item() == pytest.approx(REGRESSION["jpeg50_sum"], abs=1e-3)
    assert (jpeg * 255).round().flatten()[:6].tolist() == REGRESSION["jpeg50_head"]
    noise = build("noise", sigma=0.1).purify(x, gen(0))
    assert noise.sum().item() == pytest.approx(REGRESSION["noise_sum"], abs=1e-4)


def test_regression_ensembles(fixed_images):
    tte = build("tte", transforms=["id", "hflip", "dx=1"])
    out = tte.expand(fixed_images)  # [12, 1, 8, 8]
    assert out.sum().item() == pytest.approx(REGRESSION["tte_sum"], abs=1e-4)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # one item, three copies
    assert tte.aggregate(logits).probs[0, 0].item() == pytest.approx((0.880797 + 0.119203 + 0.5) / 3, abs=1e-5)
    sm = build("smoothing", sigma=0.25, n0=2, n=8)
    assert sm.expand(fixed_images, gen(0)).sum().item() == pytest.approx(REGRESSION["smoothing_sum"], abs=1e-3)


# Recorded with torch 2.14.1 / Pillow 13.0 (libjpeg-turbo) on the fixed_images fixture.
REGRESSION = {
    "median_sum": 95.81632995605469,
    "jpeg50_sum": 98.26666259765625,
    "jpeg50_head": [0.0, 40.0, 73.0, 106.0, 150.0, 183.0],
    "noise_sum": 98.63151550292969,
    "tte_sum": 282.25,
    "smoothing_sum": 983.3394165039062,
}
