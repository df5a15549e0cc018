"""Diffusion purification (DiffPure) on tiny untrained UNets and an exact oracle denoiser."""

import json

import pytest
import torch

from robustgate.defenses.base import FitData, build
from robustgate.defenses.purify.diffusion import (
    CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, DiffusionPurifier, ddim_purify, make_schedulers, reverse_timesteps,
)

pytestmark = pytest.mark.filterwarnings("ignore:diffusion. purifying with an untrained UNet")
TINY = {"block_out_channels": [8, 16], "t_star": 50, "steps": 3}


@pytest.fixture(scope="module")
def tiny():
    return build("diffusion", **TINY)


def test_keeps_shape_dtype_range_and_pads_odd_sizes(tiny):
    for shape in [(3, 1, 28, 28), (2, 1, 13, 10)]:
        x = torch.rand(shape)
        y = tiny.purify(x, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == torch.float32
        assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()


@pytest.mark.filterwarnings("error")
def test_an_untrained_model_warns_once():
    p = build("diffusion", **TINY)
    with pytest.warns(UserWarning, match="untrained UNet"):
        p.purify(torch.rand(1, 1, 8, 8))
    p.purify(torch.rand(1, 1, 8, 8))  # no second warning (the filter turns one into an error)


def test_t_star_zero_returns_the_input_exactly():
    p = build("diffusion", block_out_channels=[8, 16], t_star=0)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(p.purify(x, torch.Generator().manual_seed(0)), x)


def test_gradients_flow_through_the_ddim_steps(tiny):
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    y = tiny.purify(x, torch.Generator().manual_seed(0))
    assert y.requires_grad
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # without requires_grad the proxy path builds no graph
    assert not tiny.purify(torch.rand(1, 1, 8, 8)).requires_grad


def test_seeded_generator_reproduces_and_different_seeds_differ(tiny):
    x = torch.rand(2, 1, 8, 8)
    a = tiny.purify(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, tiny.purify(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, tiny.purify(x, torch.Generator().manual_seed(6)))


def test_reverse_timesteps():
    assert reverse_timesteps(100, 2) == [100, 50]
    assert reverse_timesteps(100, 4) == [100, 75, 50, 25]
    assert reverse_timesteps(3, 10) == [3, 2, 1]  # never more distinct steps than t*
    assert reverse_timesteps(100, 1) == [100]


@pytest.mark.parametrize("t_star,steps", [(100, 1), (250, 5), (999, 10)])
def test_ddim_with_an_exact_denoiser_recovers_the_single_training_image(t_star, steps):
    """If the data is one image c, the optimal eps_theta(z, t) = (z - sqrt(abar_t) c) / sqrt(1 - abar_t)
    and DDIM (eta = 0) must return c from any start -- checks the update equations and indexing."""
    _, ddim = make_schedulers(1000)
    abar = ddim.alphas_cumprod
    c01 = torch.rand(1, 1, 8, 8) * 0.8 + 0.1  # the data point, pixels
    c = 2 * c01 - 1

    def oracle(z, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * c) / (1 - a).sqrt()

    x = torch.rand(3, 1, 8, 8)
    out = ddim_purify(oracle, abar, x, t_star, steps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, c01.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_fit_save_load_round_trip(tmp_path):
    p = build("diffusion", channels=1, block_out_channels=[8, 16], train_steps=3, batch_size=4, t_star=20, steps=2)
    data = torch.rand(16, 1, 8, 8)
    before = {k: v.clone() for k, v in p.unet.state_dict().items()}
    logs = []
    p.fit(FitData(data, torch.zeros(16), data[:4], torch.zeros(4)), log=logs.append)
    assert p.fitted and p.training_record["steps"] == 3 and len(p.training_record["loss_curve"]) == 1
    assert any(not torch.equal(before[k], v) for k, v in p.unet.state_dict().items())  # it trained
    files = p.save(tmp_path)
    assert files == {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "onnx": ONNX_FILE}
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["unet"]["block_out_channels"] == [8, 16]
    q = build("diffusion", **p.config())
    q.load_artifacts({role: tmp_path / name for role, name in files.items()})
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(p.purify(x, torch.Generator().manual_seed(1)), q.purify(x, torch.Generator().manual_seed(1)))
    wrong = build("diffusion", block_out_channels=[8, 24])
    with pytest.raises(ValueError, match="artifact UNet has block_out_channels"):
        wrong.load_artifacts({role: tmp_path / name for role, name in files.items()})
    with pytest.raises(ValueError, match=r"expected artifacts 'weights', 'config' \(and 'onnx'\)"):
        q.load_artifacts({"weights": tmp_path / WEIGHTS_FILE})


def test_rejects_bad_config_and_channel_mismatch(tiny):
    with pytest.raises(ValueError, match=r"t_star must be an integer in \[0, 300\]"):
        DiffusionPurifier(t_star=400)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DiffusionPurifier(steps=0)
    with pytest.raises(ValueError, match="block_out_channels must be a non-empty list of multiples of 8"):
        DiffusionPurifier(block_out_channels=[12])
    tiny.purify(torch.rand(1, 1, 8, 8))  # its untrained UNet is built for the channels of its first input
    with pytest.raises(ValueError, match="model has 1 channel"):
        tiny.purify(torch.rand(1, 3, 8, 8))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny UNet trained 2 steps and saved: safetensors + JSON + ONNX."""
    p = build("diffusion", block_out_channels=[8, 16], train_steps=2, batch_size=4, t_star=60, steps=2)
    data = torch.rand(8, 1, 12, 12)
    p.fit(FitData(data, torch.zeros(8), data[:2], torch.zeros(2)))
    root = tmp_path_factory.mktemp("diffusion-onnx")
    files = {role: root / name for role, name in p.save(root).items()}
    return p, files


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (2, 1, 13, 10)])
def test_onnx_runtime_matches_the_torch_twin(saved_tiny, shape):
    p, files = saved_tiny
    assert json.loads(files["config"].read_text())["onnx_max_abs_diff"] <= 1e-4
    q = build("diffusion", **{**p.config(), "runtime": "onnx", "onnx_threads": 1})
    q.load_artifacts(files)
    x = torch.rand(shape)
    want = p.purify(x, torch.Generator().manual_seed(3))
    got = q.purify(x, torch.Generator().manual_seed(3))
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert not torch.equal(got, x)  # it did purify


def test_onnx_runtime_refuses_gradients_and_needs_its_artifact(saved_tiny):
    p, files = saved_tiny
    q = build("diffusion", **{**p.config(), "runtime": "onnx"})
    with pytest.raises(ValueError, match="runtime 'onnx' needs the 'onnx' artifact"):
        q.purify(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="runtime 'onnx' needs the 'onnx' artifact; re-save"):
        q.load_artifacts({"weights": files["weights"], "config": files["config"]})
    q.load_artifacts(files)
    with pytest.raises(ValueError, match="runtime 'onnx' has no gradient"):
        q.purify(torch.rand(1, 1, 8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="diffusion: runtime must be one of torch, onnx"):
        build("diffusion", runtime="tensorrt")


def test_unet_is_sized_to_the_data_it_is_fitted_on(tmp_path):
    """Issue 21: channels and sample size come from the fitted images (channels=None), any H x W runs
    (padded to what the down-sampling needs and cropped back), and the bundle's params record them."""
    p = build("diffusion", block_out_channels=[8, 16, 16], train_steps=2, batch_size=4, t_star=20, steps=1)
    assert p.unet is None and p.config()["channels"] is None
    data = torch.rand(8, 3, 13, 10)  # odd, and not a multiple of the 4 the two down-samplings need
    p.fit(FitData(data, torch.zeros(8), data[:2], torch.zeros(2)))
    assert p.config()["channels"] == 3 and p.config()["sample_size"] == 13
    assert p.unet.config.in_channels == p.unet.config.out_channels == 3 and p.unet.config.sample_size == 13
    out = p.purify(data[:2], torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 13, 10)
    files = p.save(tmp_path)
    for params in (p.config(), {**p.config(), "channels": None, "sample_size": None}):
        q = build("diffusion", **params)
        q.load_artifacts({role: tmp_path / name for role, name in files.items()})
        assert q.channels == 3 and q.sample_size == 13
        assert torch.equal(q.purify(data[:2], torch.Generator().manual_seed(0)), out)
    with pytest.raises(ValueError, match="model has 3 channel"):
        p.purify(torch.rand(1, 1, 13, 10))
    with pytest.raises(ValueError, match="artifact UNet has in_channels=3, config says 1"):
        build("diffusion", **{**p.config(), "channels": 1}).load_artifacts({r: tmp_path / n for r, n in files.items()})
