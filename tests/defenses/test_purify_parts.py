"""Parts of a batch purified at once (defenses/purify/parts.py): the same values as one part."""

import threading

import pytest
import torch

from robustgate.defenses.base import build
from robustgate.defenses.purify import parts


@pytest.fixture
def two_threads():
    parts.set_threads(2)
    yield
    parts.set_threads(1)


def test_split_covers_the_batch_in_parts_worth_a_thread():
    per_image = 3 * 224 * 224
    assert parts.split(16, per_image, 2) == [(0, 8), (8, 16)]
    assert parts.split(5, per_image, 2) == [(0, 2), (2, 5)]
    assert parts.split(1, per_image, 2) == [(0, 1)]  # one image: one part
    assert parts.split(64, 28 * 28, 2) == [(0, 64)]  # a small batch is not worth a hand-off
    assert parts.split(16, per_image, 1) == [(0, 16)]
    assert parts.split(3, per_image, 8) == [(0, 1), (1, 2), (2, 3)]  # never more parts than items


def test_run_parts_uses_the_pool_and_raises_a_parts_error(two_threads):
    seen = {}

    def body(a, b):
        seen[(a, b)] = threading.get_ident()

    parts.run_parts(4, parts.MIN_PART_VALUES, body)
    assert sorted(seen) == [(0, 2), (2, 4)] and seen[(0, 2)] == threading.get_ident() != seen[(2, 4)]

    def failing(a, b):
        if a:
            raise RuntimeError(f"part {a}:{b} failed")

    with pytest.raises(RuntimeError, match="part 2:4 failed"):
        parts.run_parts(4, parts.MIN_PART_VALUES, failing)
    with pytest.raises(ValueError, match="purify threads must be an integer >= 1"):
        parts.set_threads(0)


@pytest.mark.parametrize("kind, params", [("median", {"kernel_size": 3}), ("jpeg", {"quality": 75}),
                                          ("jpeg", {"quality": 60, "subsampling": "4:2:0"})])
def test_parts_give_the_values_of_one_part(kind, params, two_threads):
    x = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    purifier = build(kind, **params)
    in_parts = purifier.purify(x)
    parts.set_threads(1)
    assert torch.equal(in_parts, purifier.purify(x))
