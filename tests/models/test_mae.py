"""Masked autoencoder (models/mae.py): exact masking, patch order, masked-only loss, encoder keys."""

from __future__ import annotations

import pytest
import torch

from robustgate.models.mae import MaskedAutoencoder, num_visible, patchify, random_masking, unpatchify

TINY = dict(dim=32, depth=2, heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("mask_ratio, visible", [(0.75, 12), (0.5, 24), (0.9, 4)])
def test_masking_keeps_exact_ratio_and_partitions_patches(mask_ratio, visible):
    L, n = 49, 32
    assert num_visible(L, mask_ratio) == visible
    m = random_masking(n, L, mask_ratio, generator=torch.Generator().manual_seed(0))
    assert m.ids_keep.shape == (n, visible) and m.mask.shape == (n, L)
    assert (m.mask.sum(dim=1) == L - visible).all(), "every image has exactly L - K masked patches"
    for i in range(n):
        keep = set(m.ids_keep[i].tolist())
        masked = set(torch.nonzero(m.mask[i]).flatten().tolist())
        assert len(keep) == visible and keep.isdisjoint(masked) and keep | masked == set(range(L))
        # ids_restore inverts the shuffle: the kept ids sit at ranks < K
        assert (m.ids_restore[i][m.ids_keep[i]] < visible).all()
    # masks differ between images (per-image randomness)
    assert len({tuple(r.tolist()) for r in m.mask}) > n // 2


def test_masking_is_seeded():
    a = random_masking(8, 49, 0.75, generator=torch.Generator().manual_seed(3))
    b = random_masking(8, 49, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)


def test_patchify_round_trip_and_matches_conv_patch_order():
    x = torch.rand(3, 1, 28, 28)
    patches = patchify(x, 4)  # [3, 49, 16]
    assert patches.shape == (3, 49, 16)
    assert torch.equal(unpatchify(patches, 4, 1), x)
    # patch index 8 = row 1, column 1 of the 7x7 grid
    assert torch.equal(patches[0, 8], x[0, 0, 4:8, 4:8].reshape(-1))


def test_forward_shapes_and_loss_is_on_masked_patches_only():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY)
    x = torch.rand(5, 1, 28, 28)
    loss, pred, masking, latent = model(x)
    assert pred.shape == (5, 49, 16) and latent.shape == (5, 1 + 12, 32) and loss.ndim == 0
    target = patchify(x, 4)
    # perfect on masked patches, garbage on visible ones -> zero loss
    fake = torch.where(masking.mask.bool().unsqueeze(-1), target, torch.full_like(target, 9.0))
    assert model.forward_loss(x, fake, masking.mask).item() == 0.0
    fake2 = torch.where(masking.mask.bool().unsqueeze(-1), target + 0.5, target)
    assert model.forward_loss(x, fake2, masking.mask).item() == pytest.approx(0.25)


def test_encoder_sees_only_visible_patches():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY).eval()
    x = torch.rand(4, 1, 28, 28)
    masking = model.sample_masking(4, generator=torch.Generator().manual_seed(1))
    # overwrite the pixels of every masked patch: the latent must not change
    patches = patchify(x, 4)
    scrambled = torch.where(masking.mask.bool().unsqueeze(-1), torch.rand_like(patches), patches)
    x2 = unpatchify(scrambled, 4, 1)
    with torch.no_grad():
        z1 = model.forward_encoder(x, masking)
        z2 = model.forward_encoder(x2, masking)
        z3 = model.forward_encoder(x.flip(-1), masking)
    torch.testing.assert_close(z1, z2)
    assert not torch.allclose(z1, z3)


def test_decoder_target_is_the_clean_image():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY)
    x = torch.rand(4, 1, 28, 28)
    masking = model.sample_masking(4)
    x_in = (x + 0.1).clamp(0, 1)
    loss, pred, _, _ = model(x, x_in=x_in, masking=masking)
    assert loss.item() == pytest.approx(model.forward_loss(x, pred, masking.mask).item())
    assert loss.item() != pytest.approx(model.forward_loss(x_in, pred, masking.mask).item())


def test_encoder_state_dict_uses_classifier_names():
    model = MaskedAutoencoder(**TINY)
    keys = set(model.encoder_state_dict())
    assert {"patch_embed.weight", "cls_token", "pos_embed", "norm.weight", "normalize.mean"} <= keys
    assert "blocks.1.linear1.weight" in keys
    assert not any(k.startswith(("head", "pre_logits", "decoder")) for k in keys)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_ratio=1.0), "mask_ratio must be in"),
        (dict(mask_ratio=0.99), "leaves no visible patch"),
        (dict(decoder_dim=30, decoder_heads=4), "divisible by decoder_heads"),
        (dict(patch_size=5), "divisible by patch_size"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedAutoencoder(**{**TINY, **kwargs})
