"""Fixtures for the proxy tests: a tiny bundle and a real proxy running on loopback.

``proxy_bundle`` is a small CNN with random (seeded) weights exported to ONNX with a dynamic
batch axis and two outputs, "logits" and "features" -- the proxy's behaviour does not depend on
the weights being trained, and random weights keep this folder fast. ``start_proxy(**overrides)``
starts the real grpc.aio server in a background thread with its own event loop, on free ports.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from robustgate.defenses import base as defenses_base
from robustgate.defenses.base import Detector, Purifier, register
from robustgate.models.bundle import SCHEMA_VERSION, BackboneSpec, Bundle, BundleSpec, InputSpec, artifact
from robustgate.proxy.config import load_config
from robustgate.proxy.serve import build_server

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


class MeanDetector(Detector):
    """Test-local detector: score = mean pixel of each item (bright images are "adversarial")."""

    kind = "test_proxy_mean"

    def score(self, x, classifier=None):  # [N, C, H, W] -> [N]
        return x.mean(dim=(1, 2, 3))


class FeatureNormDetector(Detector):
    """Test-local detector that queries the local backbone's features (OnnxClassifier)."""

    kind = "test_proxy_featnorm"

    def score(self, x, classifier=None):
        return classifier.features(x).norm(dim=1)


class BrokenDetector(Detector):
    kind = "test_proxy_broken"

    def score(self, x, classifier=None):
        raise RuntimeError("detector exploded")


class GatePurifier(Purifier):
    """Identity purifier that signals ``entered`` and blocks until ``gate`` opens (queue tests)."""

    kind = "test_proxy_gate"

    def __init__(self, gate: threading.Event, entered: threading.Event):
        self.gate, self.entered = gate, entered

    def purify(self, x, generator=None):
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise RuntimeError("gate never opened")
        return x


TEST_DEFENSES = (MeanDetector, FeatureNormDetector, BrokenDetector, GatePurifier)


@pytest.fixture(autouse=True)
def test_defenses():
    """Registers the test-local defenses for the duration of each proxy test only, so that tests
    elsewhere that iterate over the registry never see them."""
    for cls in TEST_DEFENSES:
        register(cls)
    yield
    for cls in TEST_DEFENSES:
        defenses_base._REGISTRY.pop(cls.kind, None)  # no public unregister in the contract


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(),  # [N, 4, 13, 13]
            nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),  # [N, 8, 6, 6]
            nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(),  # [N, 16]
        )
        self.head = nn.Linear(16, len(CLASSES))

    def forward(self, x):  # [N, 1, 28, 28] -> ([N, 10], [N, 16])
        f = self.body(x)
        return self.head(f), f


def write_tiny_bundle(root: Path) -> Path:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    root.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.rand(2, 1, 28, 28),), str(root / "backbone.onnx"), input_names=["input"],
        output_names=["logits", "features"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
        dynamo=False,
    )
    spec = BundleSpec(
        schema_version=SCHEMA_VERSION, name="tiny", input=InputSpec(shape=(1, 28, 28)), classes=CLASSES,
        backbone=BackboneSpec(onnx=artifact(root, "backbone.onnx"), arch="test_tiny_cnn", features_output="features"),
        provenance={"code_revision": "test"},
    )
    Bundle(root, spec).save()
    return root


@pytest.fixture(scope="session")
def proxy_bundle(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return write_tiny_bundle(tmp_path_factory.mktemp("proxy") / "tiny")


@pytest.fixture(scope="session")
def ort_logits(proxy_bundle):
    """ONNX Runtime run directly on the bundle: ``x [N, 1, 28, 28] float32 -> [N, 10]``."""
    sess = ort.InferenceSession(str(proxy_bundle / "backbone.onnx"), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


class RunningProxy:
    """A real ProxyServer on 127.0.0.1 free ports, served by an event loop in a daemon thread."""

    def __init__(self, cfg, freeze_heap: bool = False):
        self.cfg = cfg
        self.server = build_server(cfg, freeze_heap=freeze_heap)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)
        self.thread.start()
        self.port = self.call(self.server.start())
        self.metrics_port = self.server.metrics_port
        self.url = f"127.0.0.1:{self.port}"
        self.stopped = False

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def proxy_config(bundle: Path, environ: dict | None = None, **sections):
    overrides = {"bundle": str(bundle), "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    return load_config(None, environ=environ or {}, overrides=overrides)


@pytest.fixture(scope="session")
def launch(proxy_bundle):
    """``launch(**config_sections) -> RunningProxy`` that the caller stops (module-scoped proxies)."""

    def start(bundle: Path | None = None, **sections) -> RunningProxy:
        return RunningProxy(proxy_config(bundle or proxy_bundle, **sections))

    return start


@pytest.fixture
def start_proxy(proxy_bundle):
    """``start_proxy(**config_sections) -> RunningProxy``; every proxy started is stopped after the test."""
    started: list[RunningProxy] = []

    def start(bundle: Path | None = None, *, freeze_heap: bool = False, **sections) -> RunningProxy:
        p = RunningProxy(proxy_config(bundle or proxy_bundle, **sections), freeze_heap=freeze_heap)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def proxy(start_proxy) -> RunningProxy:
    """A proxy with the defaults: no defense stages, batching on."""
    return start_proxy()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port (tests/helpers/redis_server.py): (url, process)."""
    from redis_server import start_redis, stop_redis  # tests/helpers

    url, proc = start_redis(tmp_path)
    yield url, proc
    stop_redis(proc)
