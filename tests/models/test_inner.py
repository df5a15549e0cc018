"""The trainer's inner attacks stay in the eps-ball and the [0, 1] box, and really attack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustgate.models.archs import build_arch
from robustgate.models.inner import fgsm_rs, pgd, project, robust_accuracy, trades_inner
from robustgate.models.twin import load_backbone

EPS = 0.1


def _inputs(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :4] = 0.0  # pixels on the box boundary, where clipping matters
    x[:, :, -4:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


ATTACKS = {
    "fgsm_rs": lambda m, x, y, g: fgsm_rs(m, x, y, EPS, 1.25 * EPS, generator=g),
    "pgd": lambda m, x, y, g: pgd(m, x, y, EPS, 0.03, steps=5, restarts=2, generator=g),
    "pgd_no_random_start": lambda m, x, y, g: pgd(m, x, y, EPS, 0.05, steps=3, random_start=False, generator=g),
    "trades_inner": lambda m, x, y, g: trades_inner(m, x, EPS, 0.03, steps=5, generator=g),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_respects_eps_ball_and_box(name):
    torch.manual_seed(0)
    model = build_arch("cnn", width=4, hidden=8)
    model.train()
    x, y = _inputs()
    x_adv = ATTACKS[name](model, x, y, torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv != x).any(), "the attack did not move"
    assert model.training, "the attack must restore the model's train mode"
    assert all(p.grad is None for p in model.parameters()), "inner attacks must not touch parameter grads"


@pytest.mark.parametrize("name", ["fgsm_rs", "pgd", "pgd_no_random_start"])
def test_attack_raises_the_loss_of_a_trained_model(name, tiny_bundle, fmnist_subset):
    model = load_backbone(tiny_bundle)
    x, y = fmnist_subset("test", 64)
    x_adv = ATTACKS[name](model, x, y, torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.1


def test_trades_inner_raises_the_kl(tiny_bundle, fmnist_subset):
    model = load_backbone(tiny_bundle)
    x, y = fmnist_subset("test", 128)
    x_adv = trades_inner(model, x, EPS, 0.03, steps=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="batchmean")
    assert kl > 0.05


def test_robust_accuracy_is_below_clean_for_a_standard_model(tiny_bundle, fmnist_subset):
    model = load_backbone(tiny_bundle)
    x, y = fmnist_subset("test", 100)
    clean, robust = robust_accuracy(model, x, y, EPS, 0.03, steps=5, batch_size=50)
    assert clean > 0.6
    assert robust < clean - 0.2  # a tiny standard model is not robust at eps 0.1


def test_project_is_the_intersection_of_ball_and_box():
    x = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0])
    far = torch.tensor([-1.0, 1.0, 0.9, -1.0, 2.0])
    assert torch.allclose(project(far, x, 0.1), torch.tensor([0.0, 0.15, 0.6, 0.85, 1.0]))


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -0.1, "alpha": 0.1}, "eps must be >= 0"),
    ({"eps": 0.1, "alpha": 0.0}, "alpha must be > 0"),
])
def test_bad_attack_parameters_raise(kwargs, match):
    model = build_arch("cnn", width=4, hidden=8)
    x, y = _inputs(2)
    with pytest.raises(ValueError, match=match):
        fgsm_rs(model, x, y, **kwargs)
