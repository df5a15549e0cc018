"""Every attack stays within eps and the [0, 1] box; PGD breaks a standard model at eps 0.3;
BPDA beats plain PGD on JPEG; the joint loss evades a detector better than ignoring it; the
black-box attack only sees what the served pipeline answers."""

import pytest
import torch

from robustgate.attacks.differentiable import BackboneOnly, PipelineTwin
from robustgate.attacks.joint import JointPGD
from robustgate.attacks.square import LocalOracle, SquareLinf
from robustgate.attacks.suite import ATTACKS, AttackContext, threat_model
from robustgate.attacks.threat import check_perturbation, perturbation_norm
from robustgate.defenses.pipeline import REJECTED
from assembly import served, stages_of  # tests/helpers: the one assembly, as eval uses it

JPEG = [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 60}}]


def _served_outcome(tiny, cfg, x_adv, y):
    """(attack success rate = accepted and wrong, rejection rate) on the served ONNX pipeline."""
    out = served(tiny, cfg)(x_adv)
    rejected = out.verdict == REJECTED
    fooled = ~rejected & (out.logits.argmax(1) != y)
    return fooled.float().mean().item(), rejected.float().mean().item()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_stays_in_ball_and_box(name, tiny, backbone, test_images, hf_threshold):
    x, y = test_images[0][:12], test_images[1][:12]
    cfg = [{"name": "hf", "kind": "attacks_test_hf", "threshold": hf_threshold},
           {"name": "noise", "kind": "noise", "params": {"sigma": 0.05}}, *JPEG]
    twin = PipelineTwin(backbone, stages_of(cfg, tiny, twin=True))
    oracle = LocalOracle(served(tiny, cfg))
    ctx = AttackContext(BackboneOnly(backbone), twin, oracle, num_classes=10)
    a = ATTACKS[name]
    eps = 1.0 if a.norm == "l2" else (0.3 if name == "autoattack" else 0.1)
    tm = threat_model(name, eps, n=len(x), steps=5, restarts=2, eot=2, queries=30)
    if name == "autoattack":
        tm = threat_model(name, eps, n=len(x), steps=5, restarts=1, eot=1, queries=30)
    torch.manual_seed(0)
    adv = ATTACKS[name].run(ctx, tm, x, y)
    check_perturbation(adv, x, tm.norm, eps, who=name)
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.all(perturbation_norm(adv, x, tm.norm) <= eps * (1 + 1e-5) + 1e-6)
    assert (adv != x).any(), f"{name} did not perturb anything"


def test_pgd_at_eps_03_breaks_a_standard_model(tiny, backbone, test_images):
    x, y = test_images
    twin = BackboneOnly(backbone)
    tm = threat_model("pgd", 0.3, n=len(x), steps=10, restarts=1, eot=1, queries=1)
    torch.manual_seed(0)
    adv = ATTACKS["pgd"].run(AttackContext(twin, PipelineTwin(backbone, []), None, 10), tm, x, y)
    check_perturbation(adv, x, "linf", 0.3)
    success, _ = _served_outcome(tiny, [], adv, y)
    robust_accuracy = 1 - success
    assert robust_accuracy <= 0.05, f"robust accuracy {robust_accuracy:.3f} at eps 0.3 on a standard-trained model"


def test_bpda_beats_plain_pgd_on_jpeg(tiny, backbone, test_images):
    """Plain PGD through the JPEG stage gets no gradient (the codec hides it: only the random
    start moves the input); BPDA's straight-through backward pass restores it."""
    x, y = test_images
    stages = stages_of(JPEG, tiny, twin=True)
    torch.manual_seed(0)
    plain = JointPGD(PipelineTwin(backbone, stages, bpda=False), eps=0.05, steps=20)(x, y)
    torch.manual_seed(0)
    bpda = JointPGD(PipelineTwin(backbone, stages, bpda=True), eps=0.05, steps=20)(x, y)
    for adv in (plain, bpda):
        check_perturbation(adv, x, "linf", 0.05)
    plain_success, _ = _served_outcome(tiny, JPEG, plain, y)
    bpda_success, _ = _served_outcome(tiny, JPEG, bpda, y)
    assert bpda_success > plain_success + 0.1, (bpda_success, plain_success)


def test_joint_loss_evades_the_detector_better_than_ignoring_it(tiny, backbone, test_images, hf_threshold):
    x, y = test_images
    cfg = [{"name": "hf", "kind": "attacks_test_hf", "action": "reject", "threshold": hf_threshold}]
    twin = PipelineTwin(backbone, stages_of(cfg, tiny, twin=True))
    tm = threat_model("bpda", 0.1, n=len(x), steps=20, restarts=1, eot=1, queries=1)
    ctx = AttackContext(BackboneOnly(backbone), twin, None, 10)
    torch.manual_seed(0)
    ignoring = ATTACKS["bpda"].run(ctx, tm, x, y)
    torch.manual_seed(0)
    joint = JointPGD(twin, eps=0.1, steps=20)(x, y)
    check_perturbation(joint, x, "linf", 0.1)
    ign_success, ign_rejected = _served_outcome(tiny, cfg, ignoring, y)
    joint_success, joint_rejected = _served_outcome(tiny, cfg, joint, y)
    assert joint_rejected < ign_rejected, (joint_rejected, ign_rejected)
    assert joint_success > ign_success, (joint_success, ign_success)


def test_square_sees_rejections_as_failed_queries(tiny, backbone, test_images):
    x, y = test_images[0][:16], test_images[1][:16]
    # a detector that rejects everything: every query fails, nothing is ever accepted
    reject_all = [{"name": "hf", "kind": "attacks_test_hf", "action": "reject", "threshold": -1.0}]
    oracle = LocalOracle(served(tiny, reject_all))
    logits, rejected = oracle(x)
    assert rejected.all() and torch.isnan(logits).all()
    attack = SquareLinf(oracle, eps=0.2, queries=20)
    adv = attack(x, y)
    check_perturbation(adv, x, "linf", 0.2)
    assert torch.all(attack.queries_used == 20)  # never "succeeded": the budget is spent
    # undefended: the same budget fools some items, and stops querying the ones it fooled
    open_oracle = LocalOracle(served(tiny, []))
    attack = SquareLinf(open_oracle, eps=0.2, queries=100)
    adv = attack(x, y)
    check_perturbation(adv, x, "linf", 0.2)
    success, _ = _served_outcome(tiny, [], adv, y)
    assert success > 0.3
    assert attack.queries_used.min() < 100


@pytest.mark.filterwarnings("ignore:diffusion. purifying with an untrained UNet")
def test_eot_attacks_through_the_diffusion_sampler(tiny, backbone, test_images):
    """The diffusion purifier is randomized and differentiable: the twin backpropagates through
    its DDIM steps (not a straight-through surrogate) and the EOT attack averages over its noise."""
    x, y = test_images[0][:6], test_images[1][:6]
    cfg = [{"name": "diffpure", "kind": "diffusion",
            "params": {"t_star": 20, "steps": 1, "block_out_channels": [8, 16, 16]}}]
    with pytest.raises(ValueError, match="runs a fitted model, but the bundle has no fitted defense 'diffpure'"):
        stages_of(cfg, tiny, twin=True)  # the red team attacks what the proxy would serve: nothing here
    twin = PipelineTwin(backbone, stages_of(cfg, None, twin=True))  # an untrained UNet, no bundle
    assert twin.randomized and twin.non_differentiable == []
    # the purifier's Jacobian is not the identity: the gradient really goes through the UNet
    xg = x.clone().requires_grad_(True)
    twin.generator = torch.Generator().manual_seed(0)
    v = torch.randn_like(x)
    (g,) = torch.autograd.grad((twin.purify(xg) * v).sum(), xg)
    assert torch.isfinite(g).all() and not torch.allclose(g, v, atol=1e-3)
    twin.generator = None
    tm = threat_model("eot", 0.1, n=len(x), steps=3, restarts=1, eot=2, queries=1)
    torch.manual_seed(0)
    adv = ATTACKS["eot"].run(AttackContext(BackboneOnly(backbone), twin, None, 10), tm, x, y)
    check_perturbation(adv, x, "linf", 0.1)
    assert (adv != x).any()


@pytest.mark.filterwarnings("ignore:diffusion. purifying with an untrained UNet")
def test_bfloat16_twin_differentiates_the_sampler_in_bfloat16_and_stays_close(backbone, test_images):
    """``PipelineTwin(precision=torch.bfloat16)`` (``robustgate eval --twin-precision bfloat16``):
    the diffusion sampler's UNet runs under autocast, its output comes back as float32, and the
    purified images and the input gradient stay close to the float32 twin's for the same noise."""
    x = test_images[0][:6]
    cfg = [{"name": "diffpure", "kind": "diffusion",
            "params": {"t_star": 20, "steps": 2, "block_out_channels": [8, 16, 16]}}]
    stages = stages_of(cfg, None, twin=True)
    v = torch.randn_like(x)

    def purified_and_gradient(precision):
        twin = PipelineTwin(backbone, stages, generator=torch.Generator().manual_seed(0), precision=precision)
        xg = x.clone().requires_grad_(True)
        out = twin.purify(xg)
        (g,) = torch.autograd.grad((out * v).sum(), xg)
        return out.detach(), g

    out32, g32 = purified_and_gradient(None)
    out16, g16 = purified_and_gradient(torch.bfloat16)
    assert out16.dtype == torch.float32 and g16.dtype == torch.float32
    assert not torch.equal(out16, out32)  # the UNet really ran in bfloat16 ...
    assert (out16 - out32).abs().max() < 0.05  # ... and purifies (nearly) the same way
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
