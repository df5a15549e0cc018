"""The twin computes what is served: the proxy's runner on its ONNX Runtime backend and the torch
PipelineTwin give the same logits on clean inputs, stage by stage."""

import pytest
import torch

from robustgate.attacks.differentiable import PipelineTwin
from assembly import served, stages_of  # tests/helpers: the one assembly, as eval uses it

CONFIGS = {
    "none": [],
    "jpeg": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 60}}],
    "bitdepth+median": [{"name": "bits", "kind": "bitdepth", "params": {"bits": 3}},
                        {"name": "median", "kind": "median", "params": {"kernel_size": 3}}],
    "noise": [{"name": "noise", "kind": "noise", "params": {"sigma": 0.1}}],
    "detector+tte": [{"name": "hf", "kind": "attacks_test_hf", "action": "reject", "threshold": 0.05},
                     {"name": "tte", "kind": "tte"}],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_twin_matches_served_onnx_pipeline(name, tiny, backbone, test_images):
    x, _ = test_images
    cfg = CONFIGS[name]
    out = served(tiny, cfg, seed=7)(x)  # the proxy's runner: each batch's generator seeded with 7
    twin = PipelineTwin(backbone, stages_of(cfg, tiny, twin=True))
    twin.generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        logits = twin(x)
        scores = twin.detector_scores(x)
    torch.testing.assert_close(logits, out.logits, atol=2e-4, rtol=1e-4)
    assert set(scores) == set(out.scores)
    for k in scores:
        torch.testing.assert_close(scores[k], out.scores[k], atol=1e-6, rtol=1e-5)


def test_bpda_forward_is_the_real_purifier_and_backward_the_surrogate(tiny, backbone, test_images):
    x, _ = test_images
    stages = stages_of(CONFIGS["jpeg"], tiny, twin=True)
    jpeg = stages[0].defense
    with_bpda = PipelineTwin(backbone, stages, bpda=True)
    without = PipelineTwin(backbone, stages, bpda=False)
    torch.testing.assert_close(with_bpda.purify(x), jpeg.purify(x))
    xg = x[:4].clone().requires_grad_(True)
    with_bpda.purify(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones_like(xg))  # identity surrogate
    assert not without.purify(x[:4].clone().requires_grad_(True)).requires_grad
    assert with_bpda.non_differentiable == ["jpeg"] and not with_bpda.randomized
