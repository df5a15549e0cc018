"""The runner's fused-only path (defenses/assemble.py ``PipelineRunner._run_fused``: every stage a
detector fused into the backbone's session, verdicts in numpy) gives exactly the general path's
result (DefendedModel on the same fused pass): logits, verdicts, reasons, scores, thresholds --
with reject, flag and log actions, thresholds sitting exactly on a score, and several detectors
that hit the same items; pipelines it does not cover take the general path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from robustgate.defenses.assemble import PipelineRunner
from robustgate.defenses.base import Detector
from robustgate.defenses.detect.magnet import autoencoder, reconstruction_error_graph
from robustgate.defenses.pipeline import Stage
from robustgate.defenses.runtime import export_onnx
from robustgate.models.bundle import Bundle
from robustgate.proxy.backends.onnx import OnnxBackend, OnnxClassifier


class AEError(Detector):
    """Test-local detector: an autoencoder's L``p`` reconstruction error, as one ONNX graph that
    the backend fuses (``onnx_score_model``) and as its own session (``score``)."""

    kind = "test_fused_ae_error"

    def __init__(self, graph: onnx.ModelProto, threshold: float | None = None):
        super().__init__(threshold)
        self.graph = graph
        self._session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    def score(self, x: torch.Tensor, classifier=None) -> torch.Tensor:  # [N, C, H, W] -> [N]
        (s,) = self._session.run(None, {self._session.get_inputs()[0].name: x.numpy()})
        return torch.from_numpy(s)

    def onnx_score_model(self) -> onnx.ModelProto:
        return self.graph


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fused") / "ae.onnx"
    export_onnx(autoencoder("III", 1, 8, "relu").eval(), torch.zeros(2, 1, 28, 28), path)
    model = onnx.load(str(path))
    return {p: reconstruction_error_graph(model, p) for p in (1, 2)}


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    b = OnnxBackend(Bundle.load(tiny_bundle), intra_op_threads=1)
    yield b
    b.close()


def runner(backend, stages) -> PipelineRunner:
    return PipelineRunner(stages=stages, backend=backend, classifier=OnnxClassifier(backend), seed=0)


def general(r: PipelineRunner, x: np.ndarray, clients=None):
    fast, r.fused_only = r.fused_only, False
    try:
        return r(x, clients=clients)
    finally:
        r.fused_only = fast


def assert_same(got, want):
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert got.verdict.dtype == want.verdict.dtype == torch.int64
    assert got.verdict.tolist() == want.verdict.tolist()
    assert got.reason == want.reason
    assert got.scores.keys() == want.scores.keys()
    for k in want.scores:
        torch.testing.assert_close(got.scores[k], want.scores[k], rtol=0, atol=0)
    assert got.thresholds == want.thresholds
    assert got.failed_stages == want.failed_stages == [] and got.blocked == want.blocked == []
    assert got.radius is None and want.radius is None
    assert set(got.seconds) == set(want.seconds) == {"classify"}


def test_fused_path_equals_the_general_path(backend, graphs):
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    x[:4] = 0.5  # a few easy items
    stages = [Stage("l1", AEError(graphs[1], 1.0), "reject"), Stage("l2", AEError(graphs[2], 1.0), "flag"),
              Stage("l2_log", AEError(graphs[2]), "log")]
    r = runner(backend, stages)
    assert r.fused_only
    scores = general(r, x).scores
    # thresholds exactly on a score (ties are not over the threshold), at medians, and a log stage without one
    for t1, t2 in ((float(scores["l1"][3]), float(scores["l2"][5])),
                   (float(scores["l1"].median()), float(scores["l2"].median())),
                   (float(scores["l1"].min()) - 1, float(scores["l2"].min()) - 1)):
        stages[0].defense.threshold, stages[1].defense.threshold = t1, t2
        stages[2].defense.threshold = None
        got, want = r(x), general(r, x)
        assert_same(got, want)
        assert set(got.verdict.tolist()) - {0}  # something was flagged or rejected
    # clients (no stateful stage): checked, not used
    assert_same(r(x, clients=["peer:a"] * 16), general(r, x, clients=["peer:a"] * 16))
    with pytest.raises(ValueError, match="one identity per item"):
        r(x, clients=["peer:a"])


def test_other_pipelines_take_the_general_path(backend, graphs):
    class Unfused(AEError):
        def onnx_score_model(self):
            return None

    class TwoSided(AEError):
        def is_adversarial(self, scores):
            return scores.abs() > self.threshold

    assert not runner(backend, [Stage("l1", AEError(graphs[1], 1.0)), Stage("u", Unfused(graphs[2], 1.0))]).fused_only
    assert not runner(backend, [Stage("t", TwoSided(graphs[1], 1.0))]).fused_only
    assert not runner(backend, []).fused_only


def test_a_pipeline_without_stages_passes_through_as_the_general_path(backend, graphs):
    r = runner(backend, [])
    assert r.passthrough and not r.fused_only
    x = np.random.default_rng(3).random((5, 1, 28, 28), dtype=np.float32)
    got = r(x, clients=["peer:a"] * 5)
    r.passthrough = False
    try:
        want = r(x, clients=["peer:a"] * 5)
    finally:
        r.passthrough = True
    assert_same(got, want)
    assert got.verdict.tolist() == [0] * 5 and got.reason == [None] * 5 and got.scores == {} == got.thresholds
    # a tensor batch, and a strided view of one, answer the same
    assert_same(r(torch.from_numpy(x)), want)
    assert_same(r(np.asfortranarray(x)), want)
    assert not runner(backend, [Stage("l1", AEError(graphs[1], 1.0))]).passthrough


def test_fused_path_with_a_stateful_stage_equals_the_general_path(backend, graphs):
    """Fused detectors plus the stateful stage (deploy/default.yaml's documented pipeline) stay on the
    fused path, and over a stream of batches -- near-copies from one client until it is blocked,
    fresh images from others, a client with no history -- give the general path's results, blocks
    included. Two runners with identical stores (same key), one per path, see the same stream."""
    from robustgate.defenses.stateful import Blacklight, MemoryStore

    def stages():
        store = MemoryStore(max_entries=4096, max_per_client=4096, hashes_per_query=20, key=bytes(range(16)))
        return [Stage("l1", AEError(graphs[1], 1.0), "reject"),
                Stage("stateful", Blacklight(store=store, threshold=10.0), "block", cooldown_s=60.0, block_after=2)]

    fast, slow = runner(backend, stages()), runner(backend, stages())
    assert fast.fused_only and slow.fused_only
    rng = np.random.default_rng(1)
    base = rng.random((1, 1, 28, 28), dtype=np.float32)
    blocked_seen = False
    for step in range(6):
        x = np.concatenate([base + rng.normal(0, 0.01, (4, 1, 28, 28)).astype(np.float32),  # one attacker's near-copies
                            rng.random((4, 1, 28, 28), dtype=np.float32)]).clip(0, 1)
        clients = ["attacker"] * 4 + [f"benign{step}-{i}" for i in range(4)]
        got, want = fast(x, clients=clients), general(slow, x, clients=clients)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        assert got.verdict.tolist() == want.verdict.tolist() and got.reason == want.reason
        assert got.scores.keys() == want.scores.keys() == {"l1", "stateful"}
        for k in want.scores:
            torch.testing.assert_close(got.scores[k].float(), want.scores[k].float(), rtol=0, atol=0)
        assert got.thresholds == want.thresholds and got.failed_stages == want.failed_stages == []
        # the same items blocked, until the same moment (each path reads the clock itself)
        assert [b is None for b in got.blocked] == [b is None for b in want.blocked]
        assert all(abs(g - w) < 5 for g, w in zip(got.blocked, want.blocked) if g is not None)
        blocked_seen |= any(b is not None for b in got.blocked)
    assert blocked_seen  # the stream did reach a block
    # without clients (the red team's single batches) the stateful stage is skipped on both paths
    got, want = fast(x), general(slow, x)
    assert got.verdict.tolist() == want.verdict.tolist() and "stateful" not in got.scores


def test_knn_encoder_fused_or_in_its_own_session_gives_the_same_verdicts(backend, graphs, knn_encoder, fmnist_subset):
    """The k-NN stateful stage with its encoder fused into the backbone's pass (the shipped default
    beside MagNet), in its own session (a detector that offers no embedding graph), and on the
    general path give the same scores, verdicts and blocks over a stream: one attacker's near-copies
    until it is blocked, exact retries, fresh images from other clients."""
    from robustgate.defenses.stateful.knn import KnnDetector
    from robustgate.defenses.stateful.knn_store import KnnMemoryStore

    class OwnSession(KnnDetector):
        def onnx_embedding_model(self):
            return None

    def stages(cls):
        det = cls(k=2, dim=8, width=4, threshold=0.5,
                  store=KnnMemoryStore(max_entries=4096, max_per_client=4096, key=bytes(range(16))))
        det.load_artifacts({"encoder_onnx": knn_encoder})
        return [Stage("l1", AEError(graphs[1], 1e9), "reject"), Stage("knn", det, "block", cooldown_s=60.0, block_after=3)]

    fused, own, slow = runner(backend, stages(KnnDetector)), runner(backend, stages(OwnSession)), runner(backend, stages(KnnDetector))
    assert fused.fused.stages == ("l1", "knn") and own.fused.stages == ("l1",)
    assert fused.fused_only and own.fused_only
    # the threshold: between the attacker's near-copies and fresh pictures, from the fused encoder
    x = fmnist_subset("test", 200)[0].numpy()
    emb = fused.fused(x)[2]["knn"]
    near = fused.fused(np.clip(x[:1] + 0.01, 0, 1))[2]["knn"]
    d_near = float(np.linalg.norm(emb[0] - near[0]))
    for r in (fused, own, slow):
        r.stages[1].defense.threshold = float(1 / (1 + 2 * d_near + 1e-3))
    rng = np.random.default_rng(2)
    blocked_seen, flagged_seen = False, False
    for step in range(7):
        attack = np.clip(x[:1] + rng.uniform(-0.02, 0.02, (3, 1, 28, 28)), 0, 1).astype(np.float32)
        batch = np.concatenate([attack, x[:1], x[10 + 4 * step:14 + 4 * step]])  # near-copies, a retry, fresh ones
        clients = ["attacker"] * 4 + [f"benign{i}" for i in range(4)]
        got, mine, want = fused(batch, clients=clients), own(batch, clients=clients), general(slow, batch, clients=clients)
        for other in (mine, want):
            assert got.verdict.tolist() == other.verdict.tolist() and got.reason == other.reason
            torch.testing.assert_close(got.scores["knn"], other.scores["knn"], rtol=0, atol=0)
            assert [b is None for b in got.blocked] == [b is None for b in other.blocked]
        flagged_seen |= bool(got.scores["knn"][:4].max() > fused.stages[1].defense.threshold)
        blocked_seen |= any(b is not None for b in got.blocked)
    assert flagged_seen and blocked_seen  # the stream did reach a detection and a block
    assert float(got.scores["knn"][4:].max()) <= fused.stages[1].defense.threshold  # fresh pictures pass


def test_stateful_threshold_in_numpy_equals_the_tensor_comparison():
    """run_stateful compares a stateful stage's float32 scores with its threshold in numpy (the base
    ``is_adversarial``): the same items as the tensor comparison, thresholds exactly on a score,
    between two float32 neighbours and at float64 values that round onto a score included."""
    from robustgate.defenses.pipeline import run_stateful
    from robustgate.defenses.stateful.knn_store import KnnMemoryStore
    from robustgate.defenses.stateful.base import StatefulDetector

    class Fixed(StatefulDetector):  # scores given by the test, through the real stage step
        kind = "test_fixed_scores"

        def __init__(self, scores, threshold):
            super().__init__(threshold=threshold, store=KnnMemoryStore())
            self.scores = scores

        def _encode(self, x):
            return (np.arange(x.shape[0]),)

        def _observe_groups(self, groups, now):
            return [torch.from_numpy(self.scores[rows]) for _, (rows,) in groups]

    rng = np.random.default_rng(0)
    s = rng.random(64).astype(np.float32)
    x = torch.zeros(64, 1, 2, 2)
    for t in [float(s[3]), float(np.nextafter(s[3], np.float32(1))), float(s[5]) + 1e-9, float(s[7]) - 1e-9, 0.5]:
        verdict, reason = [0] * 64, [None] * 64
        run_stateful([Stage("fixed", Fixed(s, t), "reject")], x, [f"c{i}" for i in range(64)], verdict, reason,
                     {}, {}, {}, lambda stage: None)
        want = torch.nonzero(torch.from_numpy(s) > t).flatten().tolist()
        assert [i for i, v in enumerate(verdict) if v] == want
