"""MAE/MIMIR fine-tuning recipe (models/vit_finetune.py) and the ViT options it uses (archs.ViTTiny)."""

from __future__ import annotations

import pytest
import torch

from robustgate.models.archs import DropPathEncoderLayer, build_arch
from robustgate.models.vit_finetune import finetune, layer_id, lr_at, param_groups_lrd

TINY = dict(dim=32, depth=2, heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_layer_decay_groups_follow_mae():
    model = build_arch("vit_tiny", **TINY, pos_embed="sincos")
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in groups:
        for p in g["params"]:
            seen[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == trainable and "pos_embed" not in seen  # fixed sin-cos: not optimized
    assert seen["patch_embed.weight"] == (pytest.approx(0.65 ** 3), 0.05)
    assert seen["cls_token"] == (pytest.approx(0.65 ** 3), 0.0)
    assert seen["blocks.0.linear1.weight"] == (pytest.approx(0.65 ** 2), 0.05)
    assert seen["blocks.1.self_attn.in_proj_weight"] == (pytest.approx(0.65), 0.05)
    assert seen["blocks.1.norm1.weight"] == (pytest.approx(0.65), 0.0)
    assert seen["head.weight"] == (1.0, 0.05) and seen["head.bias"] == (1.0, 0.0)
    assert seen["norm.weight"][0] == 1.0 and seen["pre_logits.weight"][0] == 1.0
    assert layer_id("blocks.1.linear2.bias", 2) == 2 and layer_id("normalize.mean", 2) == 0
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_lrd(model, 0.05, 0.0)


def test_finetune_schedule_warms_up_then_decays_to_min_lr():
    lrs = [lr_at(s, 50, 5, 1e-2, 1e-6) for s in range(50)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[4] == pytest.approx(1e-2)
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < 1e-4 and lrs[-1] >= 1e-6


def test_vit_options_round_trip_and_pooling():
    torch.manual_seed(0)
    kwargs = dict(**TINY, pool="mean", drop_path=0.1, pos_embed="sincos")
    model = build_arch("vit_tiny", **kwargs).eval()
    assert all(isinstance(b, DropPathEncoderLayer) for b in model.blocks)
    twin = build_arch("vit_tiny", **kwargs)
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), model(x))
        h = model.forward_tokens(model.embed(x))
        torch.testing.assert_close(model.features(x), torch.relu(model.pre_logits(h[:, 1:].mean(1))))
    # the drop-path blocks keep nn.TransformerEncoderLayer's keys: a plain (cls, learned) model loads them
    plain = build_arch("vit_tiny", **TINY)
    plain.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="pool must be one of"):
        build_arch("vit_tiny", **TINY, pool="max")


def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_training():
    torch.manual_seed(0)
    layer = DropPathEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True, drop_path=0.5)
    plain = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(64, 5, 16)
    layer.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x))
        layer.train()
        out = layer(x)
    untouched = (out == x).flatten(1).all(dim=1)  # both branches dropped: p = 0.25 per sample
    assert 2 <= untouched.sum() <= 40


def test_finetune_trains_and_is_seeded(fmnist_subset):
    x, y = fmnist_subset("train", 64)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_arch("vit_tiny", **TINY, pool="mean", drop_path=0.1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        r = finetune(model, x, y, steps=3, batch_size=32, eps=0.1, pgd_steps=2, progress=False, log_every=1)
        assert r.steps == 3 and len(r.loss) == 3 and not model.training
        assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(model, x[:8], y[:8], steps=1, batch_size=32, progress=False)


def test_fine_tuning_options_export_to_onnx(tmp_path):
    """A mean-pooled, drop-path, sin-cos vit_tiny exports and matches torch (what a MIMIR bundle holds)."""
    from robustgate.models.export import export_onnx

    torch.manual_seed(0)
    model = build_arch("vit_tiny", **TINY, pool="mean", drop_path=0.1, pos_embed="sincos").eval()
    errors = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    assert errors["logits"] < 1e-4 and errors["features"] < 1e-4
