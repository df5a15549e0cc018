"""Cheap purifiers: JPEG, Gaussian noise, bit-depth reduction, median filter."""

import numpy as np
import pytest
import torch
import torchattacks

from robustgate.defenses.base import build
from robustgate.defenses.purify.bitdepth import reduce_bit_depth
from robustgate.defenses.purify import jpeg
from robustgate.defenses.purify.jpeg import JpegPurifier, jpeg_roundtrip
from robustgate.defenses.purify.median import median_filter


def test_jpeg_quality_100_is_near_identity_on_grayscale(two_class_data):
    x = two_class_data[0][:16]
    y = JpegPurifier(quality=100).purify(x)
    assert (y - x).abs().max() <= 3 / 255  # 1/255 rounding + the finest quantization table
    assert (y - x).abs().mean() < 0.5 / 255


def test_jpeg_low_quality_changes_an_adversarial_input(two_class_data, two_class_model):
    x, labels = two_class_data[0][:32], two_class_data[1][:32]
    assert (two_class_model(x).argmax(1) == labels).float().mean() > 0.9
    adv = torchattacks.PGD(two_class_model, eps=0.25, alpha=0.05, steps=20, random_start=False)(x, labels)
    assert (two_class_model(adv).argmax(1) == labels).float().mean() < 0.5  # the attack works
    purified = JpegPurifier(quality=10).purify(adv)
    change = (purified - adv).abs().mean().item()
    assert change > 0.02, f"JPEG q10 changed the adversarial input by only {change:.4f} per pixel"
    # and much more than at quality 100
    assert change > 5 * (JpegPurifier(quality=100).purify(adv) - adv).abs().mean().item()


def test_jpeg_supports_rgb_and_rejects_other_channel_counts():
    x = torch.full((2, 3, 16, 16), 0.5)
    x[:, 0] = 0.8
    y = jpeg_roundtrip(x, 90)
    assert y.shape == x.shape and (y - x).abs().max() < 0.05  # a flat colour survives the codec
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels"):
        JpegPurifier().purify(torch.rand(1, 2, 8, 8))


@pytest.mark.parametrize("n, h, w, c, quality", [
    (64, 28, 28, 1, 75), (7, 28, 28, 1, 30), (1, 28, 28, 1, 100), (5, 13, 21, 3, 75), (3, 16, 8, 3, 50),
])
def test_jpeg_mosaic_decodes_each_image_exactly_as_alone(n, h, w, c, quality):
    """The batch is coded as one mosaic; every image must come back bit-identical to its own round
    trip through the codec (blocks are coded independently; libjpeg's edge padding is reproduced)."""
    rng = np.random.default_rng(n * h + c)
    smooth = np.linspace(0, 255, h * w * c).reshape(h, w, c)
    pixels = np.clip(smooth + rng.normal(0, 40, (n, h, w, c)), 0, 255).astype(np.uint8)  # [N, H, W, C]
    pixels[0] = 255 - pixels[0]  # an edge-heavy image beside the others
    mode = "L" if c == 1 else "RGB"
    alone = np.stack([jpeg._codec(img[..., 0] if c == 1 else img, mode, quality) for img in pixels]).reshape(pixels.shape)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # [N, C, H, W] on the 1/255 grid
    y = jpeg_roundtrip(x, quality)
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert torch.equal(y * 255, torch.from_numpy(alone).permute(0, 3, 1, 2).float())  # the grid is exact


@pytest.mark.parametrize("subsampling", ["4:2:2", "4:2:0"])
def test_jpeg_chroma_subsampling_codes_each_rgb_image_alone(subsampling):
    """With subsampled chroma every RGB image goes through the codec on its own (the mosaic would not
    be exact: libjpeg's chroma upsampling reads across image borders) and matches Pillow's own
    round trip of it at that subsampling; the chroma resolution is what the parameter says."""
    import io

    from PIL import Image
    from PIL.JpegImagePlugin import get_sampling

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 20, 18, 3), dtype=np.uint8)  # [N, H, W, 3]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    y = JpegPurifier(quality=80, subsampling=subsampling).purify(x)
    for img, got in zip(pixels, y):
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=80, subsampling=subsampling)
        buf.seek(0)
        with Image.open(buf) as decoded:
            assert get_sampling(decoded) == jpeg.SUBSAMPLING[subsampling]  # the file says what was asked
            want = np.asarray(decoded.convert("RGB"))
        assert torch.equal(got * 255, torch.from_numpy(want).permute(2, 0, 1).float())
    # subsampled chroma loses more colour detail than full-resolution chroma at the same quality
    full = JpegPurifier(quality=80).purify(x)
    assert (y - x).abs().mean() > (full - x).abs().mean()


def test_jpeg_grayscale_stays_grayscale_and_colour_survives():
    gray = torch.rand(2, 1, 24, 24)
    out = JpegPurifier(quality=75, subsampling="4:2:0").purify(gray)  # subsampling does not apply to one channel
    assert out.shape == (2, 1, 24, 24) and torch.equal(out, JpegPurifier(quality=75).purify(gray))
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 0.9
    for subsampling in ("4:4:4", "4:2:0"):
        y = JpegPurifier(quality=50, subsampling=subsampling).purify(red)
        assert (y - red).abs().max() < 0.03  # YCbCr round trip keeps a flat colour
    with pytest.raises(ValueError, match="subsampling must be one of 4:4:4, 4:2:2, 4:2:0"):
        JpegPurifier(subsampling="420")


def test_jpeg_rounds_each_pixel_to_the_nearest_level_before_coding(monkeypatch):
    coded = []
    monkeypatch.setattr(jpeg, "_codec", lambda img, mode, quality: coded.append(img.copy()) or img)
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 1.0, 254.49 / 255, 127.51 / 255]).reshape(1, 1, 2, 3)
    y = jpeg_roundtrip(x, 90)  # the codec replaced by the identity: only the rounding is left
    assert coded[0][:2, :3].tolist() == [[0, 0, 1], [255, 254, 128]]
    assert torch.equal(y * 255, torch.tensor([[0.0, 0, 1], [255, 254, 128]]).reshape(1, 1, 2, 3))


def test_jpeg_mosaic_too_large_for_one_picture_goes_in_slices(monkeypatch):
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (10, 1, 28, 28), dtype=np.uint8)).float() / 255
    whole = jpeg_roundtrip(x, 75)
    monkeypatch.setattr(jpeg, "MAX_SIDE", 64)  # two 32-pixel cells per side at most
    assert torch.equal(jpeg_roundtrip(x, 75), whole)


def test_jpeg_keeps_float64_and_an_empty_batch():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert JpegPurifier(quality=90).purify(x).dtype == torch.float64
    assert JpegPurifier().purify(torch.rand(0, 1, 8, 8)).shape == (0, 1, 8, 8)


def test_noise_matches_its_formula_and_sigma_zero_is_identity(fixed_images):
    g = torch.Generator().manual_seed(3)
    y = build("noise", sigma=0.05).purify(fixed_images, g)
    eps = torch.randn(fixed_images.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(y, (fixed_images + 0.05 * eps).clamp(0, 1))
    assert torch.equal(build("noise", sigma=0.0).purify(fixed_images), fixed_images)


def test_noise_has_the_configured_standard_deviation():
    x = torch.full((64, 1, 16, 16), 0.5)
    y = build("noise", sigma=0.1).purify(x, torch.Generator().manual_seed(0))
    assert abs((y - x).std().item() - 0.1) < 0.005
    assert abs((y - x).mean().item()) < 0.005


def test_noise_is_differentiable():
    x = torch.full((2, 1, 8, 8), 0.5, requires_grad=True)
    build("noise", sigma=0.01).purify(x, torch.Generator().manual_seed(0)).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_bitdepth_levels(fixed_images):
    y = reduce_bit_depth(fixed_images, 1)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    y3 = build("bitdepth", bits=3).purify(fixed_images)
    assert len(y3.unique()) <= 8
    assert (y3 - fixed_images).abs().max() <= 0.5 / 7 + 1e-6
    # regression: a ramp of 8 values quantized to 2 bits
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8)
    torch.testing.assert_close(reduce_bit_depth(ramp, 2).flatten() * 3, torch.tensor([0., 0., 1., 1., 2., 2., 3., 3.]))
    assert torch.equal(build("bitdepth", bits=8).purify(torch.tensor([[[[0.2, 0.6]]]])),
                       torch.round(torch.tensor([[[[0.2, 0.6]]]]) * 255) / 255)


def test_median_removes_a_salt_pixel_and_keeps_ramps(fixed_images):
    y = build("median", kernel_size=3).purify(fixed_images)
    assert torch.allclose(y[2], torch.full_like(y[2], 0.25))  # the salt pixel is gone
    # a linear ramp is its own median away from the border (reflection folds it at the edge)
    torch.testing.assert_close(y[0][..., 1:-1], fixed_images[0][..., 1:-1])
    torch.testing.assert_close(y[1][..., 1:-1, :], fixed_images[1][..., 1:-1, :])


def test_median_matches_a_hand_computed_window():
    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5) / 24
    x[0, 0, 2, 2] = 1.0  # centre pixel 12/24 -> 1.0
    y = median_filter(x, 3)
    # centre window {6,7,8,11,24*,13,16,17,18}/24 -> median 13/24
    assert y[0, 0, 2, 2].item() == pytest.approx(13 / 24)
    # corner (0, 0) with reflect padding: window rows {6,5,6},{1,0,1},{6,5,6} -> median 5/24
    assert y[0, 0, 0, 0].item() == pytest.approx(5 / 24)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_median_matches_scipy(kernel_size):
    """The 3x3 sorted-column min/max and the k x k sort agree with scipy's median filter (its "mirror"
    mode is torch's "reflect"), ties and 3-channel images included."""
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(kernel_size)
    x = torch.randint(0, 8, (4, 3, 11, 9), generator=g).float() / 7  # few levels: many ties
    want = ndimage.median_filter(x.numpy(), size=(1, 1, kernel_size, kernel_size), mode="mirror")
    assert torch.equal(median_filter(x, kernel_size), torch.from_numpy(want))


def test_median_kernel_one_is_identity_and_too_large_kernel_fails(fixed_images):
    assert torch.equal(build("median", kernel_size=1).purify(fixed_images), fixed_images)
    with pytest.raises(ValueError, match="reflect padding"):
        build("median", kernel_size=17).purify(fixed_images)


def test_median_passes_gradients():
    x = torch.rand(1, 1, 6, 6, requires_grad=True)
    build("median").purify(x).sum().backward()
    assert x.grad.abs().sum() > 0 and x.grad.sum().item() == pytest.approx(36.0)  # each output routes 1


def test_median_in_chunks_matches_scipy(monkeypatch):
    """The served path (no autograd, CPU) filters chunks of images into one output with its
    intermediates reused: one image per chunk gives the same values as scipy and as the autograd path."""
    ndimage = pytest.importorskip("scipy.ndimage")
    import robustgate.defenses.purify.median as median

    monkeypatch.setattr(median, "CHUNK_VALUES", 1)  # one image per chunk
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8, (3, 3, 10, 12), generator=g).float() / 7  # few levels: many ties
    want = torch.from_numpy(ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror"))
    assert torch.equal(median_filter(x, 3), want)
    assert torch.equal(median_filter(x.clone().requires_grad_(True), 3).detach(), want)
    assert median_filter(x[:0], 3).shape == (0, 3, 10, 12)
