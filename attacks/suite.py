"""The attacks ``robustgate eval`` knows, by name, and how each one is run.

Non-adaptive baselines (differentiate the undefended **backbone**; their examples are then sent
through the served pipeline -- what an attacker ignorant of the defense achieves), all from
torchattacks:

- ``fgsm`` -- Goodfellow et al., ICLR 2015 (l-inf, one step);
- ``pgd`` -- Madry et al., ICLR 2018 (l-inf, random start, step 2.5*eps/steps, restarts keep the
  first restart that fools the model: torchattacks ``MultiAttack``);
- ``cw`` -- Carlini & Wagner, S&P 2017 (l2; unbounded by construction, projected onto the
  eps-ball afterwards);
- ``deepfool`` -- Moosavi-Dezfooli et al., CVPR 2016 (l2, minimal perturbation, projected);
- ``autoattack`` -- Croce & Hein, ICML 2020, *standard* version as published: APGD-CE, APGD-T,
  FAB-T (100 steps each) and Square (5000 queries). Built from torchattacks' components because
  torchattacks' own ``AutoAttack(version="standard")`` runs APGD/FAB with 10 steps.

Adaptive (differentiate the **pipeline** twin, :mod:`robustgate.attacks.differentiable`):

- ``bpda`` -- PGD through the pipeline with BPDA for every non-differentiable purifier
  (Athalye et al., ICML 2018); with no such purifier it is white-box PGD through the pipeline;
- ``eot`` -- EOT-PGD (torchattacks ``EOTPGD``): gradients averaged over ``eot`` draws of every
  randomized stage, BPDA where needed; with gradients through differentiable purifiers'
  own steps (a diffusion purifier declaring ``differentiable = True`` is attacked through its
  sampler here);
- ``joint`` -- :class:`robustgate.attacks.joint.JointPGD`, evades the detectors while fooling
  the classifier (Carlini & Wagner, AISec 2017).

MIMIR's adaptive attacks (Xu et al., arXiv 2312.04960) on the backbone's encoder, white-box:

- ``pgd-mi`` -- :class:`robustgate.attacks.pgd_mi.PGDMI`, PGD on CE + lambda * HSIC(z, x + delta);
- ``feature-pgd`` -- :class:`robustgate.attacks.feature_pgd.FeaturePGD`, PGD pushing the encoder's
  representation of x + delta away from that of x.

Black-box: ``square`` -- :class:`robustgate.attacks.square.SquareLinf` against the served
pipeline's answers only (the proxy's runner in process, or the live gRPC endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchattacks
from torch import nn

from robustgate.attacks.differentiable import PipelineTwin
from robustgate.attacks.feature_pgd import FeaturePGD
from robustgate.attacks.joint import JointPGD
from robustgate.attacks.pgd_mi import PGDMI
from robustgate.attacks.square import QueryOracle, SquareLinf
from robustgate.attacks.threat import Norm, Target, ThreatModel, project


@dataclass
class AttackContext:
    """What an attack may use: the undefended backbone module, the pipeline twin (BPDA on), the
    served pipeline as a query oracle, and the number of classes."""

    backbone: nn.Module
    twin: PipelineTwin
    oracle: QueryOracle
    num_classes: int
    seed: int = 0


@dataclass(frozen=True)
class AttackDef:
    name: str
    norm: Norm
    target: Target
    adaptive: bool
    run: Callable[[AttackContext, ThreatModel, torch.Tensor, torch.Tensor], torch.Tensor]
    fixed_steps: int | None = None  # the attack's own iteration count (CW, DeepFool, AutoAttack)
    # (threat model, undefended backbone module) -> the attack's own settings, written into the cell's threat model
    params: Callable[[ThreatModel, nn.Module], dict] | None = None


def _fgsm(ctx, tm, x, y):
    return torchattacks.FGSM(ctx.backbone, eps=tm.eps)(x, y)


def _pgd_on(model: nn.Module, tm: ThreatModel, x, y, eot: int = 1):
    alpha = 2.5 * tm.eps / tm.steps
    if eot > 1:
        runs = [torchattacks.EOTPGD(model, eps=tm.eps, alpha=alpha, steps=tm.steps, eot_iter=eot)
                for _ in range(tm.restarts)]
    else:
        runs = [torchattacks.PGD(model, eps=tm.eps, alpha=alpha, steps=tm.steps, random_start=True)
                for _ in range(tm.restarts)]
    attack = runs[0] if len(runs) == 1 else torchattacks.MultiAttack(runs)
    return attack(x, y)


def _pgd(ctx, tm, x, y):
    return _pgd_on(ctx.backbone, tm, x, y)


def _cw(ctx, tm, x, y):
    adv = torchattacks.CW(ctx.backbone, c=1.0, kappa=0.0, steps=tm.steps, lr=0.01)(x, y)
    return project(adv, x, "l2", tm.eps)


def _deepfool(ctx, tm, x, y):
    adv = torchattacks.DeepFool(ctx.backbone, steps=tm.steps, overshoot=0.02)(x, y)
    return project(adv, x, "l2", tm.eps)


def _autoattack(ctx, tm, x, y):
    m, k, s = ctx.backbone, ctx.num_classes, ctx.seed
    parts = [
        torchattacks.APGD(m, norm="Linf", eps=tm.eps, steps=tm.steps, n_restarts=1, loss="ce", seed=s),
        torchattacks.APGDT(m, norm="Linf", eps=tm.eps, steps=tm.steps, n_restarts=1, n_classes=k, seed=s),
        torchattacks.FAB(m, norm="Linf", eps=tm.eps, steps=tm.steps, n_restarts=1, multi_targeted=True,
                         n_classes=k, seed=s),
        torchattacks.Square(m, norm="Linf", eps=tm.eps, n_queries=5000, n_restarts=1, seed=s),
    ]
    return torchattacks.MultiAttack(parts)(x, y)


def _bpda(ctx, tm, x, y):
    return _pgd_on(ctx.twin, tm, x, y)


def _eot(ctx, tm, x, y):
    return _pgd_on(ctx.twin, tm, x, y, eot=tm.eot)


def _joint(ctx, tm, x, y):
    return JointPGD(ctx.twin, eps=tm.eps, steps=tm.steps, restarts=tm.restarts, eot=tm.eot)(x, y)


def _module(ctx) -> nn.Module:
    return getattr(ctx.backbone, "backbone", ctx.backbone)  # the nn.Module inside BackboneOnly


def _pgd_mi(ctx, tm, x, y):
    return PGDMI(_module(ctx), eps=tm.eps, steps=tm.steps)(x, y)


def _feature_pgd(ctx, tm, x, y):
    return FeaturePGD(_module(ctx), eps=tm.eps, steps=tm.steps)(x, y)


def _square(ctx, tm, x, y):
    return SquareLinf(ctx.oracle, eps=tm.eps, queries=tm.queries or 1000, seed=ctx.seed)(x, y)


ATTACKS: dict[str, AttackDef] = {a.name: a for a in [
    AttackDef("fgsm", "linf", "backbone", False, _fgsm, fixed_steps=1),
    AttackDef("pgd", "linf", "backbone", False, _pgd),
    AttackDef("cw", "l2", "backbone", False, _cw, fixed_steps=100),
    AttackDef("deepfool", "l2", "backbone", False, _deepfool, fixed_steps=50),
    AttackDef("autoattack", "linf", "backbone", False, _autoattack, fixed_steps=100),
    AttackDef("bpda", "linf", "pipeline", True, _bpda),
    AttackDef("eot", "linf", "pipeline", True, _eot),
    AttackDef("joint", "linf", "pipeline", True, _joint),
    AttackDef("square", "linf", "endpoint", True, _square, fixed_steps=1),
    # MIMIR's adaptive attacks on the backbone's encoder (docs/MIMIR.md); their step size,
    # lambda, representation... are written into the cell's threat model
    AttackDef("pgd-mi", "linf", "backbone", True, _pgd_mi,
              params=lambda tm, module: PGDMI(module, eps=tm.eps, steps=tm.steps).params()),
    AttackDef("feature-pgd", "linf", "backbone", True, _feature_pgd,
              params=lambda tm, module: FeaturePGD(module, eps=tm.eps, steps=tm.steps).params()),
]}


def threat_model(name: str, eps: float, n: int, steps: int, restarts: int, eot: int, queries: int) -> ThreatModel:
    """The threat model an attack actually runs under (fixed iteration counts win; EOT only for
    attacks that average over draws; restarts only where the attack restarts)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    a = ATTACKS[name]
    return ThreatModel(
        attack=name, norm=a.norm, eps=eps, steps=a.fixed_steps or steps,
        restarts=restarts if name in ("pgd", "bpda", "eot", "joint") else 1,
        eot=eot if name in ("eot", "joint") else 1, target=a.target,
        queries=queries if name == "square" else None, n=n,
    )
