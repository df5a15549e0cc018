"""Blacklight's fingerprint and scoring rule, on the in-memory store (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustgate.defenses.stateful import Blacklight, MemoryStore, build_store
from robustgate.defenses.stateful.blacklight import digests, top_k_distinct, window_hashes, window_key

KEY = bytes(range(16))


def _reference_window_hash(window: list[int], wkey, bits: int) -> int:
    """One window's hash written out in Python integers (window_hashes' docstring, steps 1-3)."""
    m = 0
    for i in range(0, len(window), 2):
        y = window[i] | (window[i + 1] << bits) if i + 1 < len(window) else window[i]
        m = (m + int(wkey.coeffs[i // 2]) * y) % 2**64
    h = m ^ int(wkey.final)
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = (h * mult) % 2**64
    return h ^ (h >> 33)


@pytest.mark.parametrize("window, stride", [(20, 1), (7, 3), (1, 1), (2, 2)])
def test_window_hashes_match_the_formula_and_depend_only_on_the_window(window, stride):
    wkey = window_key(KEY, 64, 50, window)
    levels = np.random.default_rng(0).integers(0, 6, (3, 64)).astype(np.uint8)
    levels[1, 30:30 + window] = levels[0, 2:2 + window]  # the same window at another position
    h = window_hashes(levels, wkey, window, stride)
    length = (64 - window) // stride + 1
    assert h.shape == (3, length) and h.dtype == np.uint64
    for n in range(3):
        for j in range(length):
            lv = levels[n, j * stride:j * stride + window].tolist()
            assert int(h[n, j]) == _reference_window_hash(lv, wkey, wkey.bits)
    same = window_hashes(np.stack([levels[0, 2:2 + window], levels[1, 30:30 + window]]), wkey, window, 1)
    assert same[0, 0] == same[1, 0]
    other = window_key(bytes(16), 64, 50, window)
    assert not np.array_equal(h, window_hashes(levels, other, window, stride))


def test_window_key_bits_fit_the_largest_level():
    assert window_key(KEY, 10, 50, 20).bits == 3  # levels 0..6
    assert window_key(KEY, 10, 1, 20).bits == 8  # levels 0..255
    assert window_key(KEY, 10, 255, 20).bits == 1  # levels 0..1


def test_top_k_distinct_keeps_the_largest_distinct_values_padded_with_zero():
    h = np.array([[5, 9, 9, 1, 7], [3, 3, 3, 3, 3]], dtype=np.uint64)
    assert top_k_distinct(h.copy(), 3).tolist() == [[5, 7, 9], [0, 0, 3]]
    assert top_k_distinct(h.copy(), 6).tolist() == [[0, 0, 1, 5, 7, 9], [0, 0, 0, 0, 0, 3]]
    # long rows (the partial selection) with many repeats among the largest (the full sort), against a set
    rng = np.random.default_rng(0)
    rows = rng.integers(1, 2**40, (50, 300)).astype(np.uint64)  # distinct: the partial selection answers
    rows[::2, :200] = 2**41  # one repeated largest value crowds the 2k largest: the full sort answers
    rows[1::4] %= 30  # rows with fewer than k distinct values
    got = top_k_distinct(rows.copy(), 20)
    for row, out in zip(rows, got):
        want = sorted(set(row.tolist()))[-20:]
        assert out.tolist() == [0] * (20 - len(want)) + want


def _detector(**kw) -> Blacklight:
    return Blacklight(store=MemoryStore(max_entries=4096, max_per_client=4096, hashes_per_query=20, key=KEY), **kw)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 20, 24)])
def test_near_copy_matches_unrelated_image_does_not_retry_scores_zero(shape):
    g = torch.Generator().manual_seed(0)
    d = _detector()
    x = torch.rand(1, *shape, generator=g)
    assert d.observe("a", x).tolist() == [0.0]  # empty history
    assert d.observe("a", x.clone()).tolist() == [0.0]  # an exact retry is not evidence
    near = x.clone()
    near[0, :, 1:3, 1:3] = torch.rand(shape[0], 2, 2, generator=g)  # a Square-like step
    assert float(d.observe("a", near)[0]) >= 15
    assert float(d.observe("a", torch.rand(1, *shape, generator=g))[0]) <= 3  # unrelated noise
    assert d.observe("b", near.clone()).tolist() == [0.0]  # another client's history is separate


def test_a_batch_is_scored_in_order_and_matches_one_by_one():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 28, 28, generator=g)
    steps = x.repeat(6, 1, 1, 1)
    for i in range(1, 6):
        steps[i:, 0, 2 * i:2 * i + 2, 3:5] = torch.rand(2, 2, generator=g)
    batched = _detector().observe("c", steps)
    one = _detector()
    single = torch.cat([one.observe("c", steps[i:i + 1]) for i in range(6)])
    assert torch.equal(batched, single)
    assert batched[0] == 0 and (batched[1:] >= 15).all()


def test_several_clients_in_one_call_score_as_one_after_the_other():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 28, 28, generator=g)
    steps = x.repeat_interleave(4, 0)  # [8]: client a's 4 near-copies of x[0], then b's of x[1]
    for i in (1, 2, 3, 5, 6, 7):  # a Square-like step each
        steps[i, 0, 3 * i:3 * i + 2, 10:12] = torch.rand(2, 2, generator=g)
    one = _detector()
    want = [one.observe("a", steps[:4]), one.observe("b", steps[4:])]
    together = _detector()
    enc = together.encode(steps)
    got = together.observe_groups([("a", tuple(a[:4] for a in enc)), ("b", tuple(a[4:] for a in enc))])
    assert all(torch.equal(w, g_) for w, g_ in zip(want, got))
    assert (got[0][1:] >= 15).all() and (got[1][1:] >= 15).all()
    with pytest.raises(ValueError, match="client"):
        together.observe_groups([("", enc)])


def test_the_fingerprint_depends_on_the_secret_key():
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    a = Blacklight(store=MemoryStore(max_entries=16, max_per_client=16, key=KEY)).fingerprint(x)
    b = Blacklight(store=MemoryStore(max_entries=16, max_per_client=16, key=bytes(16))).fingerprint(x)
    assert np.array_equal(a, Blacklight(store=MemoryStore(max_entries=16, max_per_client=16, key=KEY)).fingerprint(x))
    assert len(np.intersect1d(a[0], b[0])) == 0


def test_config_round_trips_and_the_store_is_not_configuration():
    d = _detector(window=12, top_k=10, threshold=7.0)
    cfg = d.config()
    assert cfg == {"quantization": 50, "window": 12, "stride": 1, "top_k": 10, "threshold": 7.0, "value_range": (0.0, 1.0)}
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    again = Blacklight(**cfg, store=MemoryStore(max_entries=4096, max_per_client=4096, key=KEY))
    assert np.array_equal(d.fingerprint(x), again.fingerprint(x))


@pytest.mark.parametrize("kw, match", [({"window": 0}, "window"), ({"quantization": 300}, "quantization"),
                                       ({"top_k": 1.5}, "top_k"), ({"threshold": "x"}, "threshold")])
def test_bad_parameters_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        Blacklight(**kw)


def test_bad_input_fails_loudly():
    d = _detector()
    with pytest.raises(ValueError, match="outside the declared range"):
        d.observe("a", torch.full((1, 1, 28, 28), 2.0))
    with pytest.raises(ValueError, match="client"):
        d.observe("", torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="window 20 is longer"):
        d.observe("a", torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="no threshold"):
        d.is_adversarial(torch.zeros(1))


def test_build_store_validates_the_config():
    with pytest.raises(ValueError, match="backend"):
        build_store({"backend": "disk"})
    with pytest.raises(ValueError, match="max_per_client"):
        build_store({"max_entries": 10, "max_per_client": 11})
    with pytest.raises(ValueError, match="ttl_s"):
        build_store({"ttl_s": 0})
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_store({"max_entrys": 5})


def test_history_survives_a_config_reload_when_the_store_is_handed_over():
    store = MemoryStore(max_entries=4096, max_per_client=4096, key=KEY)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 28, 28, generator=g)
    Blacklight(store=store, threshold=9.0).observe("a", x)
    reloaded = Blacklight(**{**Blacklight(store=store).config(), "threshold": 12.0}, store=store)  # new config, same store
    step = x.clone()
    step[0, 0, 7:9, 7:9] = torch.rand(2, 2, generator=g)
    assert bool(reloaded.is_adversarial(reloaded.observe("a", step))[0])
    store.clear()
    assert store.stats()["entries"] == 0 and store.stats()["clients"] == 0
    assert reloaded.observe("a", step.clone() * 0.5).tolist() == [0.0]


@pytest.mark.parametrize("path", ["compiled", "numpy"])
@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (2, 3, 32, 32), (3, 3, 1, 1), (2, 3, 160, 160)])
def test_digests_are_the_keyed_multilinear_hash_of_the_raw_float32_words(shape, path, monkeypatch):
    """Each item's digest is the docstring's two strongly universal halves over its float32 words,
    computed here with Python integers from the SHAKE-256 coefficients; a float64 or non-contiguous
    tensor is hashed as its float32 C-order words; the key and the input size each change it.
    ``path``: numba's compiled loop (3x160x160: its variant that releases the GIL), or numpy's
    product (an environment without numba)."""
    import hashlib

    from robustgate.defenses.stateful import blacklight

    if path == "numpy":
        monkeypatch.setattr(blacklight, "digest_kernel", lambda release_gil=False: None)
    elif blacklight.digest_kernel() is None:
        pytest.skip("numba is not installed: the numpy path is tested beside")
    key = bytes(range(16))
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    words = x.reshape(shape[0], -1).numpy().view(np.uint32)
    d = words.shape[1]
    stream = hashlib.shake_256(b"rg-retry-digest" + key + d.to_bytes(8, "little")).digest(16 * (d + 1))
    m = [[int.from_bytes(stream[8 * (j * (d + 1) + i):8 * (j * (d + 1) + i + 1)], "little") for i in range(d + 1)]
         for j in range(2)]
    halves = [[(m[j][0] + sum(c * int(w) for c, w in zip(m[j][1:], row))) % 2**64 >> 32 for j in range(2)]
              for row in words]
    want = np.array([lo | hi << 32 for lo, hi in halves], dtype=np.uint64)
    np.testing.assert_array_equal(digests(x, key), want)
    np.testing.assert_array_equal(digests(x.double(), key), want)
    np.testing.assert_array_equal(digests(x.transpose(2, 3).contiguous().transpose(2, 3), key), want)
    assert len(set(digests(x, key).tolist())) == shape[0]
    assert (digests(x, bytes(16)) != want).all()  # the key matters
    padded = torch.cat([x.reshape(shape[0], -1), torch.zeros(shape[0], 1)], dim=1)  # the same words and a zero
    assert (digests(padded, key) != want).all()  # each size has its own coefficients


def test_digests_tell_apart_items_that_differ_in_one_bit():
    """Structured differences (one word's sign bit, its lowest bit, two words swapped, -0.0 for 0.0)
    change the digest: the family's bound holds for every pair, not only for random ones."""
    key = bytes(range(16))
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0] = 0.0
    variants = [x]
    for i, mask in ((5, 1 << 31), (5, 1), (400, 1 << 31), (783, 1 << 22)):
        y = x.clone()
        y.numpy().view(np.uint32).reshape(-1)[i] ^= np.uint32(mask)  # in place, through the shared buffer
        variants.append(y)
    swapped = x.clone().view(-1)
    swapped[[1, 2]] = swapped[[2, 1]]
    variants += [swapped.view(1, 1, 28, 28), x.clone().index_put_((torch.tensor([0]),) * 4, torch.tensor([-0.0]))]
    got = digests(torch.cat(variants), key).tolist()
    assert len(set(got)) == len(variants)
