"""Masked autoencoder (models/mae.py): exact masking, patch order, masked-only loss, encoder keys."""

from __future__ import annotations

import pytest
import torch

from robustgate.models.archs import sincos_pos_embed_2d
from robustgate.models.mae import (
    MaskedAutoencoder, decoder_size, norm_pix_target, num_visible, patchify, random_masking, unpatchify,
)

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
    model = MaskedAutoencoder(**TINY, norm_pix_loss=False)
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


def test_norm_pix_loss_target_is_mae_per_patch_normalization():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY)  # norm_pix_loss is the default (the reference scripts pass it)
    assert model.norm_pix_loss
    x = torch.rand(3, 1, 28, 28)
    patches = patchify(x, 4)  # [3, 49, 16]
    target = norm_pix_target(patches)
    # by hand for one patch: (v - mean) / sqrt(unbiased var + 1e-6)
    v = patches[1, 7]
    want = (v - v.mean()) / (((v - v.mean()) ** 2).sum() / (v.numel() - 1) + 1e-6).sqrt()
    torch.testing.assert_close(target[1, 7], want)
    assert target.mean(dim=-1).abs().max() < 1e-5
    masking = model.sample_masking(3, generator=torch.Generator().manual_seed(0))
    assert model.forward_loss(x, target, masking.mask).item() == pytest.approx(0.0, abs=1e-10)
    raw = MaskedAutoencoder(**TINY, norm_pix_loss=False)
    assert raw.forward_loss(x, target, masking.mask).item() > 0.1  # raw pixels are another target


def test_sincos_position_embeddings_are_fixed_and_correct():
    emb = sincos_pos_embed_2d(4, 2)  # dim 4: one frequency (1.0) per axis; 2x2 grid + cls
    assert emb.shape == (5, 4)
    assert torch.equal(emb[0], torch.zeros(4))  # class token
    s1, c1 = torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))
    torch.testing.assert_close(emb[1 + 2], torch.stack([s1, c1, torch.tensor(0.0), torch.tensor(1.0)]))  # row 1, col 0
    torch.testing.assert_close(emb[1 + 1], torch.stack([torch.tensor(0.0), torch.tensor(1.0), s1, c1]))  # row 0, col 1
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY)
    for p in (model.encoder.pos_embed, model.decoder_pos_embed):
        assert not p.requires_grad
    torch.testing.assert_close(model.encoder.pos_embed[0], sincos_pos_embed_2d(32, 7))
    before = model.encoder.pos_embed.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.rand(4, 1, 28, 28))[0].backward()
    opt.step()
    assert torch.equal(model.encoder.pos_embed, before), "fixed embeddings must not train"
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2)


def test_decoder_is_sized_to_the_encoder():
    assert decoder_size(192, 12) == (128, 2, 4)  # MIMIR's ViT-T decoder
    assert decoder_size(64, 4) == (48, 1, 1)
    model = MaskedAutoencoder(dim=64, depth=4, heads=4)
    assert model.decoder_embed.out_features == 48 and len(model.decoder_blocks) == 1
    assert model.config["decoder_dim"] == 48
    # explicit sizes still win
    assert MaskedAutoencoder(**TINY).decoder_embed.out_features == 32


def test_patch_size_two_on_28x28():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**{**TINY, "patch_size": 2})
    loss, pred, masking, latent = model(torch.rand(2, 1, 28, 28))
    assert model.num_patches == 196 and pred.shape == (2, 196, 4) and latent.shape == (2, 1 + 49, 32)
