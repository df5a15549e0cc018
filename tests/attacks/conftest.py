"""Fixtures of the red-team tests: the shared tiny bundle, its torch twin, test images, and a
small differentiable test-local detector (registered under a test-only kind, per test)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from robustgate.defenses import base as defenses_base
from robustgate.defenses.base import Detector, register


class HighFrequencyDetector(Detector):
    """Test-only detector: mean absolute difference between the image and its 3x3 box blur.

    l-inf perturbations raise local pixel variation, so the score separates attacked from clean
    images unless the attacker also minimizes it -- which the joint attack does. Differentiable."""

    kind: ClassVar[str] = "attacks_test_hf"

    def __init__(self, threshold: float | None = None):
        super().__init__(threshold)

    def score(self, x, classifier=None):  # [N, C, H, W] -> [N]
        blur = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return (x - blur).abs().mean(dim=(1, 2, 3))


@pytest.fixture(autouse=True)
def test_detector():
    """Registers the test-only detector for each test only, so that tests elsewhere that iterate
    over the registry never see it."""
    register(HighFrequencyDetector)
    yield
    defenses_base._REGISTRY.pop(HighFrequencyDetector.kind, None)  # no public unregister in the contract


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tiny_bundle):
    from robustgate.models.bundle import Bundle

    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="session")
def backbone(tiny):
    from robustgate.models.twin import load_backbone

    return load_backbone(tiny)


@pytest.fixture(scope="session")
def test_images(fmnist_subset):
    """48 test items the tiny model classifies correctly, so success rates are over fair items."""
    return fmnist_subset("test", 48)


@pytest.fixture(scope="session")
def hf_threshold(fmnist_subset):
    """The test detector's threshold at a 5% false-positive rate on 500 clean validation images."""
    x, _ = fmnist_subset("val", 500)
    s = HighFrequencyDetector().score(x)
    return float(torch.quantile(s, 0.95))
