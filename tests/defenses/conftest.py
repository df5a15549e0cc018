"""Fixtures shared by the defense tests (purification/ensembling and detection engineers: only
ADD fixtures here, never change existing ones).

- ``fixed_images``: a tiny deterministic batch ``[4, 1, 8, 8]`` float32 in [0, 1] (smooth ramps
  plus a few saturated pixels) for numeric regression checks.
- ``two_class_data``: a synthetic, smooth two-class image problem ``(x [256, 1, 16, 16], y [256])``:
  class 0 has a bright blob on the left, class 1 on the right.
- ``two_class_model``: a tiny CNN trained on ``two_class_data`` (about 1 s on one core), eval mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tests share 2 cores with other engineers' runs.
    torch.set_num_threads(1)


@pytest.fixture
def fixed_images() -> torch.Tensor:
    ramp = torch.linspace(0.0, 1.0, 8)
    x = torch.empty(4, 1, 8, 8)
    x[0, 0] = ramp[None, :].expand(8, 8)  # horizontal ramp
    x[1, 0] = ramp[:, None].expand(8, 8)  # vertical ramp
    x[2, 0] = 0.25
    x[2, 0, 3, 4] = 1.0  # one salt pixel
    x[3, 0] = (ramp[None, :] * ramp[:, None])  # product ramp
    x[3, 0, 0, 0] = 1.0
    return x


@pytest.fixture(scope="session")
def two_class_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, size = 256, 16
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    y = torch.arange(n) % 2
    cx = torch.where(y == 0, 4.0, 11.0) + torch.randn(n, generator=g)  # [N]
    cy = 7.5 + 2 * torch.randn(n, generator=g)
    d2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2  # [N, H, W]
    x = (0.9 * torch.exp(-d2 / 8.0) + 0.05).clamp(0, 1)[:, None]  # [N, 1, H, W]
    return x.float(), y


@pytest.fixture(scope="session")
def two_class_model(two_class_data) -> nn.Module:
    x, y = two_class_data
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---- detection fixtures (detection engineer) -------------------------------------------------------
# - ``tiny_classifier``: the tiny bundle's torch twin as a defenses.base.Classifier.
# - ``detect_fit_data``: FitData from the seeded Fashion-MNIST splits (3,000 train, 1,000 val).
# - ``detect_test_set``: 300 clean test images, their labels, and PGD adversarials (L-inf eps 0.1,
#   20 steps of 0.01, torchattacks) made on the tiny backbone -- the non-adaptive threat of issue 5.
# - ``fitted_magnet`` / ``fitted_safetynet``: detectors fitted on ``detect_fit_data`` (small
#   settings), not calibrated; treat as read-only (copy before changing threshold or runtime).


@pytest.fixture(scope="session")
def tiny_classifier(tiny_bundle):
    from robustgate.models.twin import TorchClassifier, load_backbone

    return TorchClassifier(load_backbone(tiny_bundle))


@pytest.fixture(scope="session")
def detect_fit_data(fmnist_subset):
    from robustgate.defenses.base import FitData

    tx, ty = fmnist_subset("train", 3000)
    vx, vy = fmnist_subset("val", 1000)
    return FitData(tx, ty, vx, vy)


@pytest.fixture(scope="session")
def detect_test_set(fmnist_subset, tiny_classifier):
    import torchattacks

    x, y = fmnist_subset("test", 300)
    adv = torchattacks.PGD(tiny_classifier.module, eps=0.1, alpha=0.01, steps=20, random_start=True)(x, y)
    return x, y, adv.detach()


@pytest.fixture(scope="session")
def fitted_magnet(detect_fit_data):
    from robustgate.defenses.base import build

    det = build("magnet", criterion="l1", arch="II", width=16, activation="relu", epochs=3, batch_size=32, lr=3e-3, seed=0)
    det.fit(detect_fit_data)
    return det


@pytest.fixture(scope="session")
def fitted_safetynet(detect_fit_data, tiny_classifier):
    from robustgate.defenses.base import build

    det = build("safetynet", levels=3, n_fit=300, steps=5, seed=0)
    det.fit(detect_fit_data, tiny_classifier)
    return det
