"""MIMIR pre-training (models/mimir.py): PGD in the ball, loss decreases, checkpoints, encoder hand-over."""

from __future__ import annotations

import json

import pytest
import torch

from robustgate.models.archs import build_arch
from robustgate.models.mae import MaskedAutoencoder
from robustgate.models import mimir
from robustgate.models.mimir import (
    PAPER_DEFAULTS, ascend, init_classifier, load_pretrained, lr_at, main, make_loader, mimir_loss, parse_sigma,
    pgd_delta, pretrain, save_pretrained, scaled_lr,
)

TINY = dict(dim=32, depth=2, heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
EPS = 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images(fmnist_subset):
    x, _ = fmnist_subset("train", 128)
    return x


def _model(seed: int = 0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(**TINY)


def test_pgd_stays_in_ball_and_box_and_raises_reconstruction_loss(images):
    model = _model()
    x = images[:32]
    masking = model.sample_masking(32, generator=torch.Generator().manual_seed(0))
    delta = pgd_delta(model, x, masking, eps=EPS, steps=5, step_size=0.03, generator=torch.Generator().manual_seed(0))
    assert delta.shape == x.shape
    assert delta.abs().max().item() <= EPS + 1e-6
    assert (x + delta).min().item() >= 0.0 and (x + delta).max().item() <= 1.0
    assert delta.abs().max().item() > 0.5 * EPS, "the attack moved"
    assert all(p.grad is None for p in model.parameters()), "PGD must not accumulate parameter gradients"
    with torch.no_grad():
        clean = model(x, masking=masking)[0].item()
        attacked = model(x, x_in=x + delta, masking=masking)[0].item()
        noise = torch.empty_like(x).uniform_(-EPS, EPS, generator=torch.Generator().manual_seed(1))
        random = model(x, x_in=(x + noise).clamp(0, 1), masking=masking)[0].item()
    assert attacked > clean and attacked > random


def test_pgd_without_budget_is_zero(images):
    model = _model()
    masking = model.sample_masking(8)
    assert torch.equal(pgd_delta(model, images[:8], masking, eps=0.0, steps=3, step_size=0.1), torch.zeros_like(images[:8]))


def test_mimir_loss_adds_the_weighted_mi_term(images):
    model = _model()
    x = images[:16]
    masking = model.sample_masking(16)
    delta = torch.full_like(x, 0.05)
    loss, rec, mi = mimir_loss(model, x, delta, masking, lam=0.5, sigma=5.0, estimator="hsic")
    assert mi.item() > 0
    assert loss.item() == pytest.approx(rec.item() + 0.5 * mi.item(), rel=1e-5)
    loss0, rec0, mi0 = mimir_loss(model, x, delta, masking, lam=0.0, sigma=5.0)
    assert loss0.item() == pytest.approx(rec.item()) and torch.isnan(mi0)


def _fixed_batch_loss(model: MaskedAutoencoder, x: torch.Tensor) -> float:
    masking = model.sample_masking(len(x), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return model(x, masking=masking)[0].item()


@pytest.mark.parametrize("method", ["mimir", "mae"])
def test_pretraining_lowers_the_loss_on_a_fixed_batch(images, method):
    model = _model()
    before = _fixed_batch_loss(model, images[:64])
    kw = dict(eps=EPS, steps=1, step_size=0.125, lam=1e-5) if method == "mimir" else dict(eps=0.0, steps=0, step_size=0.0, lam=0.0)
    result = pretrain(model, make_loader(images, 32, seed=0), epochs=4, lr=2e-3, progress=False, **kw)
    after = _fixed_batch_loss(model, images[:64])
    assert after < 0.7 * before
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    assert all(s > 0 for s in result.images_per_s)
    assert result.config["method"] == ("mimir-pretrain" if method == "mimir" else "mae-pretrain")
    if method == "mimir":
        assert all(m > 0 for m in result.mi)


def test_pretraining_is_seeded(images):
    runs = []
    for _ in range(2):
        model = _model()
        r = pretrain(model, make_loader(images[:64], 32, seed=5), epochs=1, eps=EPS, steps=1, step_size=0.125,
                     lam=1e-3, estimator="hsic", lr=1e-3, seed=5, progress=False)
        runs.append((r.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_checkpoint_round_trip(tmp_path, images):
    model = _model().eval()
    path = tmp_path / "mae.safetensors"
    digest = save_pretrained(model, path, extra={"note": "test"})
    assert len(digest) == 64
    loaded = load_pretrained(path)
    assert loaded.config == model.config  # sin-cos positions, decoder sizes, norm_pix_loss kept
    assert not loaded.encoder.pos_embed.requires_grad and loaded.norm_pix_loss
    masking = model.sample_masking(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images[:8], masking=masking)[0], loaded(images[:8], masking=masking)[0])
        torch.testing.assert_close(model(images[:8], masking=masking)[1], loaded(images[:8], masking=masking)[1])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(Exception):
        load_pretrained(tmp_path / "bad.safetensors")


def test_pretrained_encoder_loads_into_vit_tiny_and_changes_its_output(tmp_path, images):
    model = _model()
    pretrain(model, make_loader(images[:64], 32), epochs=1, eps=EPS, steps=1, step_size=0.125, lam=1e-5,
             lr=2e-3, progress=False, checkpoint=tmp_path / "mimir.safetensors")
    torch.manual_seed(1)
    clf = build_arch("vit_tiny", num_classes=10, **model.classifier_kwargs()).eval()
    x = images[:8]
    with torch.no_grad():
        before = clf(x)
    untouched = init_classifier(clf, tmp_path / "mimir.safetensors")
    assert untouched == ["head.bias", "head.weight", "pre_logits.bias", "pre_logits.weight"]
    with torch.no_grad():
        after = clf(x)
        # the classifier's encoder now computes exactly the MAE encoder's function on all patches
        model.eval()
        want = model.encoder.forward_tokens(model.encoder.embed(x))[:, 0]
        got = clf.forward_tokens(clf.embed(x))[:, 0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(got, want)
    for k, v in model.encoder_state_dict().items():
        assert torch.equal(clf.state_dict()[k], v), k


def test_init_rejects_a_mismatched_classifier():
    model = _model()
    clf = build_arch("vit_tiny", num_classes=10, **{**model.classifier_kwargs(), "dim": 48, "heads": 2})
    with pytest.raises(ValueError, match="shape mismatch"):
        init_classifier(clf, model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(eps=0.1, steps=0), "needs steps >= 1"),
        (dict(lam=-1.0), "lam must be >= 0"),
        (dict(estimator="mine"), "estimator must be one of"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(perturbation="fgsm"), "perturbation must be one of"),
        (dict(eps=0.1, steps=2, step_size=0.1, perturbation="carry"), "one step per visit"),
        (dict(eps=0.0, steps=0, step_size=0.0, perturbation="carry"), "one step per visit"),
        (dict(eps=0.1, steps=1, step_size=0.1, perturbation="carry"), r"make_loader\(\.\.\., indexed=True\)"),
    ],
)
def test_bad_pretrain_config_raises(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrain(_model(), make_loader(images[:32], 32), **{"epochs": 1, **kwargs})


def test_paper_defaults_are_the_reference_values():
    assert PAPER_DEFAULTS["eps"] == pytest.approx(8 / 255) and PAPER_DEFAULTS["steps"] == 1
    assert PAPER_DEFAULTS["lam"] == 1e-5 and PAPER_DEFAULTS["sigma"] == 5.0


def test_command_line_writes_a_loadable_checkpoint(tmp_path, capsys):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    rc = main(["--method", "mimir-pretrain", "--n", "64", "--batch-size", "32", "--dim", "32", "--depth", "1",
               "--heads", "2", "--out", str(out), "--json", str(report)])
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["config"]["method"] == "mimir-pretrain" and len(data["losses"]) == 1
    assert load_pretrained(out).config["dim"] == 32


def test_mi_share_and_pgd_time_are_logged_every_epoch(images):
    model = _model()
    r = pretrain(model, make_loader(images[:64], 32), epochs=2, eps=EPS, steps=1, step_size=0.125, lam=1e-3,
                 lr=1e-3, progress=False)
    assert len(r.mi_share) == 2 and all(0 < s < 1 for s in r.mi_share)
    # share = lam * mi / loss, batch-averaged: with equal batches it is close to the ratio of the means
    for share, mi, loss in zip(r.mi_share, r.mi, r.losses):
        assert share == pytest.approx(1e-3 * mi / loss, rel=0.05)
    assert len(r.pgd_seconds) == 2 and all(0 < p < s for p, s in zip(r.pgd_seconds, r.seconds))
    assert r.config["sigma"] == "median"  # the default kernel width
    r0 = pretrain(_model(), make_loader(images[:64], 32), epochs=1, eps=0.0, steps=0, step_size=0.0, lam=0.0,
                  lr=1e-3, progress=False)
    assert r0.mi_share == [0.0]


def test_warmup_then_cosine_and_reference_lr_scaling(images):
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4) and scaled_lr(1.5e-4, 128) == pytest.approx(7.5e-5)
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01
    # max_steps ends the run (and the schedule) early
    r = pretrain(_model(), make_loader(images[:128], 32), epochs=5, max_steps=3, lr=1e-3, eps=0.0, steps=0,
                 step_size=0.0, lam=0.0, progress=False)
    assert len(r.losses) == 1 and r.config["max_steps"] == 3


def test_parse_sigma():
    assert parse_sigma("median") is None and parse_sigma(None) is None and parse_sigma("2.5") == 2.5
    with pytest.raises(ValueError, match="sigma must be positive"):
        parse_sigma("0")


def test_pretrain_puts_model_and_batches_on_the_device(images, monkeypatch):
    """``device`` reaches the model and every batch (checked by spying on pgd_delta's input)."""
    import robustgate.models.mimir as mimir

    seen = []
    real = mimir.pgd_delta

    def spy(model, x, *a, **k):
        seen.append((x.device, next(model.parameters()).device))
        return real(model, x, *a, **k)

    monkeypatch.setattr(mimir, "pgd_delta", spy)
    pretrain(_model(), make_loader(images[:64], 32), epochs=1, lr=1e-3, progress=False, device=torch.device("cpu"))
    assert seen and all(d == (torch.device("cpu"), torch.device("cpu")) for d in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pretrain_on_cuda(images):
    model = _model()
    r = pretrain(model, make_loader(images[:64], 32), epochs=1, eps=EPS, steps=1, step_size=0.125, lam=1e-3,
                 lr=1e-3, progress=False, device="cuda")
    assert next(model.parameters()).is_cuda and r.config["device"].startswith("cuda")


# ---- perturbation "carry": each image's delta carried across epochs, moved by the training step ----
def test_ascend_is_one_signed_step_projected_on_ball_and_box(images):
    x = images[:4]
    delta = torch.full_like(x, 0.05)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    grad[:, :, :14] = 0.0  # e.g. the pixels of masked patches: no gradient
    out = ascend(x, delta, grad, eps=EPS, step_size=0.03)
    assert out.abs().max().item() <= EPS + 1e-6
    assert (x + out).min().item() >= 0.0 and (x + out).max().item() <= 1.0 + 1e-6
    free = ((x + 0.05 + 0.03 * grad.sign()).clamp(0, 1) - x).clamp(-EPS, EPS)  # where neither bound binds
    inside = (x + delta + 0.03 * grad.sign() > 0) & (x + delta + 0.03 * grad.sign() < 1)
    assert torch.allclose(out[inside], free[inside], atol=1e-6)
    assert torch.allclose(out[:, :, :14], ((x + delta).clamp(0, 1) - x)[:, :, :14]), "no gradient, no move"


def test_mimir_loss_hands_the_input_gradient_to_a_delta_that_requires_it(images):
    model = _model()
    x = images[:16]
    masking = model.sample_masking(16, generator=torch.Generator().manual_seed(0))
    d0 = torch.full_like(x, 0.03)
    loss_fixed = mimir_loss(model, x, d0, masking, lam=0.5, sigma=None, estimator="hsic")[0]
    delta = d0.clone().requires_grad_(True)
    loss, rec, mi = mimir_loss(model, x, delta, masking, lam=0.5, sigma=None, estimator="hsic")
    assert loss.item() == pytest.approx(loss_fixed.item(), rel=1e-6), "same loss whether delta tracks gradients"
    loss.backward()
    # the reference: the same loss as a function of the encoder's input, the MI term's first argument held fixed
    x_in = (x + d0).requires_grad_(True)
    _, _, _, latent = model(x, x_in=x_in, masking=masking)
    ref = model(x, x_in=x_in, masking=masking)[0] + 0.5 * mimir.ESTIMATORS["hsic"](
        (x + d0).flatten(1), latent.flatten(1), sigma_x=None, sigma_y=None)
    (want,) = torch.autograd.grad(ref, x_in)
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert torch.allclose(delta.grad, want, atol=1e-6)


def test_carried_deltas_persist_across_epochs_and_move_by_the_training_gradient(images, monkeypatch):
    """One batch per epoch, in a fixed order: the delta trained on in epoch 2 is the one epoch 1's
    update wrote, and that update was one signed step along the training loss's input gradient."""
    x = images[:32]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(32)), batch_size=32)
    seen, updates = [], []
    real_loss, real_ascend = mimir.mimir_loss, mimir.ascend

    def loss_spy(model, x_, delta, masking, **kw):
        seen.append(delta.detach().clone())
        assert delta.requires_grad, "the carried delta must collect the input gradient"
        return real_loss(model, x_, delta, masking, **kw)

    def ascend_spy(x_, delta, grad, **kw):
        out = real_ascend(x_, delta, grad, **kw)
        updates.append((delta.clone(), grad.clone(), out.clone()))
        return out

    monkeypatch.setattr(mimir, "mimir_loss", loss_spy)
    monkeypatch.setattr(mimir, "ascend", ascend_spy)
    r = pretrain(_model(), loader, epochs=3, eps=EPS, steps=1, step_size=0.04, lam=1e-3, estimator="hsic", lr=1e-3,
                 perturbation="carry", progress=False)
    assert len(seen) == 3 and len(updates) == 3
    assert seen[0].abs().max().item() <= EPS + 1e-6 and seen[0].abs().max().item() > 0.5 * EPS, "a random start"
    for epoch in (1, 2):
        assert torch.allclose(seen[epoch], updates[epoch - 1][2]), "the next epoch trains on the updated delta"
    before, grad, after = updates[0]
    assert torch.equal(before, seen[0]) and grad.abs().sum() > 0
    moved = grad != 0
    assert (after - before)[moved].abs().max().item() > 0
    assert r.config["perturbation"] == "carry" and all(p > 0 for p in r.pgd_seconds)
    assert all(m > 0 for m in r.mi)


def test_carry_pretraining_lowers_the_loss_and_is_seeded(images):
    runs = []
    for _ in range(2):
        model = _model()
        before = _fixed_batch_loss(model, images[:64])
        r = pretrain(model, make_loader(images, 32, seed=0, indexed=True), epochs=4, eps=EPS, steps=1,
                     step_size=0.125, lam=1e-3, estimator="hsic", lr=2e-3, seed=3, perturbation="carry",
                     progress=False)
        assert _fixed_batch_loss(model, images[:64]) < 0.7 * before
        runs.append((r.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_carry_from_the_command_line(tmp_path):
    report = tmp_path / "r.json"
    rc = main(["--method", "mimir-pretrain", "--perturbation", "carry", "--n", "64", "--batch-size", "32", "--dim",
               "32", "--depth", "1", "--heads", "2", "--json", str(report)])
    assert rc == 0
    assert json.loads(report.read_text())["config"]["perturbation"] == "carry"
