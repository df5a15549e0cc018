"""MIMIR's adaptive attacks (attacks/pgd_mi.py, attacks/feature_pgd.py) on a tiny trained ViT:
they stay in the l-inf ball and the [0, 1] box, raise the quantity they target (CE + lambda *
HSIC, HSIC itself at a large lambda, the encoder feature distance) above a clean / random start,
lower the accuracy, and run through `robustgate eval` on a vit_tiny bundle with their step size
and settings written into the threat model."""

from __future__ import annotations

import json

import pytest
import torch

from robustgate.attacks.feature_pgd import FeaturePGD, representation
from robustgate.attacks.pgd_mi import PGDMI, mi_term
from robustgate.attacks.threat import check_perturbation
from robustgate.models.archs import build_arch

VIT = {"dim": 32, "depth": 1, "heads": 2}
EPS = 0.1


@pytest.fixture(scope="module")
def vit(fmnist_subset):
    """A 1-block ViT trained for 120 Adam steps on 2048 images (about 50-60% clean accuracy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = fmnist_subset("train", 2048)
    torch.manual_seed(0)
    model = build_arch("vit_tiny", **VIT)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def items(fmnist_subset):
    return fmnist_subset("test", 64)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("attack", [PGDMI, FeaturePGD])
def test_stays_in_the_ball_and_the_box_and_lowers_accuracy(attack, vit, items):
    x, y = items
    torch.manual_seed(0)
    adv = attack(vit, eps=EPS, steps=10)(x, y)
    check_perturbation(adv, x, "linf", EPS, who=attack.__name__)
    assert (adv - x).abs().amax() > 0.9 * EPS  # sign steps reach the ball's surface
    clean = accuracy(vit, x, y)
    assert clean > 0.4, f"the fixture model is too weak ({clean:.2f}) for an accuracy test"
    assert accuracy(vit, adv, y) < clean - 0.2


def test_pgd_mi_raises_its_objective_and_the_hsic(vit, items):
    x, y = items
    torch.manual_seed(0)
    paper = PGDMI(vit, eps=EPS, steps=10)  # lambda 1e-5, sigma 5, normalized-CCA HSIC
    adv = paper(x, y)
    with torch.no_grad():
        assert paper.objective(adv, y) > paper.objective(x, y) + 1.0
    # with a large lambda the MI term dominates: the HSIC between x' and z(x') itself goes up
    strong = PGDMI(vit, eps=EPS, steps=10, lam=1.0)
    adv = strong(x, y)
    with torch.no_grad():
        before = mi_term(x, representation(vit, x), sigma=5.0, estimator="nhsic_cca")
        after = mi_term(adv, representation(vit, adv), sigma=5.0, estimator="nhsic_cca")
    assert after > 1.3 * before, (before, after)


def test_feature_pgd_moves_the_encoder_representation_further_than_noise(vit, items):
    x, y = items
    torch.manual_seed(0)
    attack = FeaturePGD(vit, eps=EPS, steps=10)
    adv = attack(x, y)
    noise = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)  # a random start of the same radius
    with torch.no_grad():
        z = representation(vit, x)
        assert attack.objective(x, z).max() < 1e-5  # zero at the clean start
        assert attack.objective(adv, z).mean() > 4 * attack.objective(noise, z).mean()


def test_representations_and_validation(vit, backbone):
    assert FeaturePGD(vit, eps=EPS).representation == "encoder"
    assert PGDMI(backbone, eps=EPS).representation == "features"  # the tiny CNN has no ViT encoder
    x = torch.rand(3, 1, 28, 28)
    assert representation(vit, x).shape == (3, VIT["dim"])
    with pytest.raises(ValueError, match="needs a ViT encoder"):
        representation(backbone, x, "encoder")
    with pytest.raises(ValueError, match="representation must be one of"):
        FeaturePGD(vit, eps=EPS, representation="pixels")
    with pytest.raises(ValueError, match="estimator must be one of"):
        PGDMI(vit, eps=EPS, estimator="mine")
    with pytest.raises(ValueError, match="lam must be >= 0"):
        PGDMI(vit, eps=EPS, lam=-1)
    with pytest.raises(ValueError, match="steps >= 1"):
        FeaturePGD(vit, eps=EPS, steps=0)
    assert PGDMI(vit, eps=EPS, steps=20).params()["step_size"] == pytest.approx(2.5 * EPS / 20)


def test_robustgate_eval_runs_them_on_a_vit_bundle(vit, tmp_path, capsys):
    from robustgate.models.export import write_bundle
    from robustgate.proxy.cli import main

    bundle = tmp_path / "vit"
    kwargs = {**VIT, "in_channels": 1, "num_classes": 10}
    write_bundle(bundle, vit, arch="vit_tiny", arch_kwargs=kwargs, classes=[str(i) for i in range(10)],
                 input_shape=(1, 28, 28), name="vit", seed=0, probe=torch.rand(4, 1, 28, 28))
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", str(bundle), "--attacks", "pgd,pgd-mi,feature-pgd", "--n", "32",
                 "--steps", "10", "--surface-points", "0", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    result = json.loads((out / "results.json").read_text())
    cells = {c["attack"]: c for c in result["cells"]}
    clean = result["configs"]["none"]["clean"]["clean_accuracy"]
    for name in ("pgd-mi", "feature-pgd"):
        tm = cells[name]["threat_model"]
        assert (tm["norm"], tm["eps"], tm["steps"], tm["n"]) == ("linf", 0.1, 10, 32)
        assert tm["step_size"] == pytest.approx(0.025) and tm["representation"] == "encoder"
        assert cells[name]["metrics"]["robust_accuracy"] < clean
    assert cells["pgd-mi"]["threat_model"]["lam"] == 1e-5
    assert "lam" not in cells["pgd"]["threat_model"]  # other attacks' threat models are unchanged
