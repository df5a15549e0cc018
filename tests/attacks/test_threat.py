"""The perturbation checks every attack is held to, and the projection of unbounded attacks."""

import pytest
import torch

from robustgate.attacks.threat import ThreatModel, check_perturbation, perturbation_norm, project


def test_check_accepts_in_ball_and_rejects_violations():
    x = torch.full((2, 1, 4, 4), 0.5)
    ok = x + 0.1
    check_perturbation(ok, x, "linf", 0.1)
    with pytest.raises(AssertionError, match="exceeds eps"):
        check_perturbation(x + 0.11, x, "linf", 0.1)
    with pytest.raises(AssertionError, match=r"\[0, 1\] box"):
        check_perturbation(x + 0.6, x, "linf", 1.0)
    with pytest.raises(AssertionError, match="exceeds eps"):
        check_perturbation(x + 0.1, x, "l2", 0.1)  # l2 norm of 16 * 0.1 entries is 0.4
    with pytest.raises(AssertionError, match="NaN"):
        check_perturbation(torch.full_like(x, float("nan")), x, "linf", 1.0)


def test_project_lands_in_ball_and_box():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 6, 6, generator=gen)
    far = torch.rand(5, 1, 6, 6, generator=gen) * 3 - 1
    for norm, eps in (("linf", 0.05), ("l2", 0.7)):
        p = project(far, x, norm, eps)
        check_perturbation(p, x, norm, eps)
        assert torch.all(perturbation_norm(p, x, norm) <= eps + 1e-6)


def test_threat_model_validates():
    with pytest.raises(ValueError, match="norm"):
        ThreatModel(attack="pgd", norm="l1", eps=0.1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        ThreatModel(attack="pgd", norm="linf", eps=0.1, steps=0)
    tm = ThreatModel(attack="pgd", norm="linf", eps=0.1, steps=10, n=5)
    assert "eps=0.1" in tm.describe() and tm.as_dict()["n"] == 5
