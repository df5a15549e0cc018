"""deploy/default.yaml as it ships, over bundles/default (README's first command): a real proxy on
loopback and the real tritonclient. Its anonymous clients get the label alone (the one-hot of the
backbone's argmax under the logits output's name, shape and type), a benign client's distinct images
and exact retries are answered, and a query attack's stream from one client is refused by the
stateful stage (`stateful_knn`) and then blocked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from robustgate.models.bundle import Bundle
from robustgate.proxy.config import load_config

from loopback import LoopbackProxy  # tests/helpers
from streams import ask, fmnist_images, linf_stream  # tests/helpers

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "default.yaml"
BUNDLE = REPO / "bundles" / "default"


@pytest.fixture(scope="module")
def shipped():
    p = LoopbackProxy(BUNDLE, config_file=SHIPPED)
    yield p
    p.stop()


def reference_logits(x: np.ndarray) -> np.ndarray:
    bundle = Bundle.load(BUNDLE)
    sess = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)), providers=["CPUExecutionProvider"])
    return sess.run([bundle.spec.backbone.logits_output], {bundle.input.name: x})[0]


def test_the_shipped_default_serves_magnet_and_the_knn_stage_and_answers_the_label():
    cfg = load_config(SHIPPED, environ={}, overrides={"bundle": str(BUNDLE)})
    assert [(s.name, s.kind, s.action) for s in cfg.pipeline.stages] == [
        ("magnet_l1", "magnet", "reject"), ("stateful_knn", "stateful", "block")]
    assert cfg.outputs.policy == "label" and cfg.outputs.trusted_policy is None
    assert "stateful_knn" in Bundle.load(BUNDLE).spec.defenses  # fitted: README's first command serves it


def test_benign_answers_are_one_hot_labels_and_an_attack_stream_is_blocked(shipped):
    model = Bundle.load(BUNDLE).name
    benign = fmnist_images(40, offset=7000)
    want = reference_logits(benign).argmax(axis=1)
    headers = {"x-client-id": "benign-1"}
    answered = 0
    for i, x in enumerate(benign):
        for _ in range(2 if i % 4 == 0 else 1):  # every 4th image retried: exact retries are normal traffic
            got = ask(shipped.url, x[None], headers, model=model)
            if got[0] != "ok":  # MagNet refuses ~1% of clean images (its calibrated rate), never the stateful stage
                assert "magnet_l1" in got[1] and "stateful_knn" not in got[1], got
                continue
            answered += 1
            onehot = np.zeros((1, 10), np.float32)
            onehot[0, want[i]] = 1.0
            assert got[1].dtype == np.float32 and np.array_equal(got[1], onehot), (i, got[1])
    assert answered >= 45  # of 50 queries
    # a score-based attack's queries: random points of the l-inf 0.03 ball around one image, one client
    answers = [ask(shipped.url, q[None], {"x-client-id": "attacker-1"}, model=model)
               for q in linf_stream(benign[1], 20, seed=3)]
    statuses = [a[0] for a in answers]
    assert "StatusCode.RESOURCE_EXHAUSTED" in statuses, statuses  # blocked (block_after 5)
    first_block = statuses.index("StatusCode.RESOURCE_EXHAUSTED")
    assert first_block <= 12 and set(statuses[first_block:]) == {"StatusCode.RESOURCE_EXHAUSTED"}, statuses
    assert all("stateful_knn" in a[1] for a in answers[first_block:])
    assert ask(shipped.url, benign[2][None], headers, model=model)[0] == "ok"  # the benign client is not affected
