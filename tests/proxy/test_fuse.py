"""Detector score graphs fused into the backbone's ONNX graph (proxy/backends/fuse.py): the fused
session answers the backbone's logits and features and each detector's score as the separate
sessions do; graphs that cannot be fused are refused with a reason."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from robustgate.defenses.detect.magnet import autoencoder, reconstruction_error, reconstruction_error_graph
from robustgate.defenses.runtime import export_onnx
from robustgate.models.bundle import Bundle
from robustgate.proxy.backends.fuse import fuse_score_graphs
from robustgate.proxy.backends.onnx import OnnxBackend


@pytest.fixture(scope="module")
def ae_model(tmp_path_factory):
    torch.manual_seed(0)
    ae = autoencoder("III", 1, 8, "relu").eval()
    path = tmp_path_factory.mktemp("fuse") / "ae.onnx"
    export_onnx(ae, torch.zeros(2, 1, 28, 28), path)
    return ae, onnx.load(str(path))


def run(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize("p", [1, 2])
def test_reconstruction_error_graph_equals_the_torch_score(ae_model, p):
    ae, model = ae_model
    x = np.random.default_rng(p).random((7, 1, 28, 28), dtype=np.float32)
    (got,) = run(reconstruction_error_graph(model, p), x)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        want = reconstruction_error(xt, ae(xt), p).numpy()
    assert got.shape == (7,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        reconstruction_error_graph(model, 3)


def test_fused_backbone_answers_what_the_separate_sessions_answer(tiny_bundle, ae_model):
    _, model = ae_model
    bundle = Bundle.load(tiny_bundle)
    backend = OnnxBackend(bundle, intra_op_threads=1)
    fused = backend.fused_pass({"magnet_l1": reconstruction_error_graph(model, 1),
                                "magnet_l2": reconstruction_error_graph(model, 2)})
    assert fused.stages == ("magnet_l1", "magnet_l2")
    x = np.random.default_rng(0).random((9, 1, 28, 28), dtype=np.float32)
    logits, feats, scores = fused(x)
    want_logits, want_feats = backend.infer_with_features(x)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats, want_feats, rtol=1e-6, atol=1e-6)
    for stage, p in (("magnet_l1", 1), ("magnet_l2", 2)):
        (want,) = run(reconstruction_error_graph(model, p), x)
        np.testing.assert_allclose(scores[stage], want, rtol=1e-6)
    # the backend's own session is untouched: still only the backbone's outputs
    assert backend.output_names == [o.name for o in backend.session.get_outputs()]
    assert not any(n.startswith("robustgate_fused_score/") for n in backend.output_names)
    backend.close()
    with pytest.raises(Exception, match="closed"):
        fused(x)


def test_graphs_that_cannot_be_fused_are_refused(tiny_bundle, ae_model):
    _, model = ae_model
    backbone = onnx.load(str(Bundle.load(tiny_bundle).path(Bundle.load(tiny_bundle).spec.backbone.onnx)))
    small = autoencoder("III", 1, 4, "relu").eval()
    with tempfile.TemporaryDirectory() as d:
        export_onnx(small, torch.zeros(2, 1, 14, 14), Path(d) / "ae14.onnx")
        other_shape = reconstruction_error_graph(onnx.load(str(Path(d) / "ae14.onnx")), 1)
    with pytest.raises(ValueError, match="reads .* the backbone"):
        fuse_score_graphs(backbone, {"m": other_shape})
    two_outputs = onnx.ModelProto()
    two_outputs.CopyFrom(model)  # the autoencoder itself has one output; give it a second
    two_outputs.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="one input and one output"):
        fuse_score_graphs(backbone, {"m": two_outputs})
    once, _ = fuse_score_graphs(backbone, {"m": reconstruction_error_graph(model, 1)})
    with pytest.raises(ValueError, match="collide"):  # a second "m" would shadow the first's names
        fuse_score_graphs(once, {"m": reconstruction_error_graph(model, 1)})


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (0.0, 255.0)])
def test_fused_knn_embedding_equals_the_encoder_session(tiny_bundle, ae_model, knn_encoder, fmnist_subset, value_range):
    """The k-NN stage's encoder fused beside the backbone and MagNet's score graph ([N, d] output,
    converted from the encoder's opset when an operator changed since) answers what its own session
    answers, on real images, raw pixels in the bundle's range; the logits stay the backbone's."""
    from robustgate.defenses.stateful.knn import KnnDetector

    _, model = ae_model
    lo, hi = value_range
    det = KnnDetector(k=2, dim=8, width=4, value_range=value_range)
    det.load_artifacts({"encoder_onnx": knn_encoder})
    backend = OnnxBackend(Bundle.load(tiny_bundle), intra_op_threads=1)
    graph = det.onnx_embedding_model()
    assert graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 8  # [N, d]
    fused = backend.fused_pass({"magnet_l1": reconstruction_error_graph(model, 1), "knn": graph})
    assert fused.stages == ("magnet_l1", "knn")
    x = fmnist_subset("test", 37)[0].numpy()  # [37, 1, 28, 28] in [0, 1]
    raw = (lo + x * (hi - lo)).astype(np.float32)  # what the bundle's clients send
    for n in (1, 8, 37):
        logits, _, outs = fused(x[:n] if value_range == (0.0, 1.0) else raw[:n])
        own = det.embed(torch.from_numpy(raw[:n]))
        assert outs["knn"].shape == (n, 8)
        if value_range == (0.0, 1.0):
            np.testing.assert_array_equal(outs["knn"], own)  # the same graph on the same floats
            np.testing.assert_array_equal(logits, backend.infer(x[:n]))
        else:  # the same scaling in ONNX Runtime as in torch; the same float16 values as stored
            np.testing.assert_allclose(outs["knn"], own, rtol=1e-5, atol=1e-6)
    backend.close()


def test_outputs_of_other_ranks_are_refused(tiny_bundle, ae_model):
    _, model = ae_model
    backbone = onnx.load(str(Bundle.load(tiny_bundle).path(Bundle.load(tiny_bundle).spec.backbone.onnx)))
    image = onnx.ModelProto()
    image.CopyFrom(model)  # the autoencoder's own output is an image [N, C, H, W]
    with pytest.raises(ValueError, match=r"must output \[N\] or \[N, d\]"):
        fuse_score_graphs(backbone, {"ae": image})
