"""Query streams for the stateful-stage tests (tests/proxy/test_stateful_proxy.py, test_workers.py,
test_shipped_default.py): distinct Fashion-MNIST test images, a query attack's near-duplicates of one
image, and one query through the real tritonclient."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SMALL_STORE = {"kind": "memory", "max_entries": 4096, "max_per_client": 1024, "max_clients": 64, "ttl_s": 600}


def fmnist_images(n: int, offset: int = 0) -> np.ndarray:
    """``n`` distinct Fashion-MNIST test images ``[n, 1, 28, 28]`` float32 in [0, 1]."""
    if not FMNIST.is_file():
        pytest.fail(f"{FMNIST} is missing: apt-get install -y dataset-fashion-mnist (docs: ENVIRONMENT)")
    raw = np.frombuffer(gzip.open(FMNIST).read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return (raw[offset:offset + n].astype(np.float32) / 255.0).copy()


def attack_stream(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A query attack's stream ``[n, 1, 28, 28]``: the base image plus a few +-0.05 pixel changes
    each (Square/SimBA-like near-duplicates, each query new)."""
    rng = np.random.default_rng(seed)
    out = np.repeat(base[None], n, axis=0)
    for i in range(n):
        idx = rng.integers(0, 28, size=(8, 2))
        out[i, 0, idx[:, 0], idx[:, 1]] += rng.choice([-0.05, 0.05], size=8)
    return np.clip(out, 0, 1).astype(np.float32)


def linf_stream(base: np.ndarray, n: int, eps: float = 0.03, seed: int = 0) -> np.ndarray:
    """``n`` random l-inf perturbations of ``base`` ``[1, 28, 28]`` (uniform in the eps-ball): every
    query of a score-based attack lies in such a ball."""
    rng = np.random.default_rng(seed)
    return np.clip(base[None] + rng.uniform(-eps, eps, size=(n, *base.shape)), 0, 1).astype(np.float32)


def ask(url: str, x: np.ndarray, headers: dict, model: str = "tiny"):
    """One ModelInfer of ``x`` ``[1, 1, 28, 28]`` (input ``input``) -> ("ok", logits [1, 10]) or
    (status, message)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    with tc.InferenceServerClient(url) as client:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            r = client.infer(model, [inp], headers=headers, client_timeout=60)
        except InferenceServerException as exc:
            return exc.status(), exc.message()
        return "ok", r.as_numpy("logits")
