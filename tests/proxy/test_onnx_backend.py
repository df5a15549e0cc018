"""The in-process ONNX Runtime backend and its Classifier view."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from robustgate.models.bundle import Bundle, artifact
from robustgate.proxy.backends.base import ModelMeta
from robustgate.proxy.backends.onnx import OnnxBackend, OnnxClassifier, providers_for


def test_providers_follow_the_device_setting():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    auto = providers_for("auto")
    assert auto[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert auto == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="backend.onnxruntime.device is 'cuda'"):
            providers_for("cuda")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        providers_for("tpu")


def test_backend_infers_logits_and_features(proxy_bundle, ort_logits):
    backend = OnnxBackend(Bundle.load(proxy_bundle), device="cpu", intra_op_threads=1, inter_op_threads=1)
    x = np.random.default_rng(4).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(backend.infer(x), ort_logits(x))
    meta = backend.metadata()
    assert isinstance(meta, ModelMeta) and meta.inputs[0].shape == (-1, 1, 28, 28) and meta.outputs[0].shape == (-1, 10)
    clf = OnnxClassifier(backend)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(clf.logits(t).numpy(), ort_logits(x))
    assert clf.features(t).shape == (5, 16)
    assert backend.ready()
    backend.close()
    assert not backend.ready()


def test_idle_threads_do_not_spin_unless_asked(proxy_bundle, ort_logits):
    x = np.random.default_rng(5).random((3, 1, 28, 28), dtype=np.float32)
    def entry(opts, key):
        try:
            return opts.get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default, which spins
            return None

    for spinning, want, stop in ((False, "0", None), (True, None, None), ("run", None, "1")):
        backend = OnnxBackend(Bundle.load(proxy_bundle), intra_op_threads=2, spinning=spinning)
        opts = backend.session.get_session_options()
        assert entry(opts, "session.intra_op.allow_spinning") == want
        assert entry(opts, "session.force_spinning_stop") == stop  # "run": spin only while a run is in progress
        np.testing.assert_array_equal(backend.infer(x), ort_logits(x))  # same answers either way
        backend.close()
    with pytest.raises(ValueError, match="spinning must be false, true or 'run'"):
        OnnxBackend(Bundle.load(proxy_bundle), spinning="always")


def test_features_without_a_features_output_is_a_clear_error(proxy_bundle, tmp_path):
    import onnx

    root = tmp_path / "logits_only"
    shutil.copytree(proxy_bundle, root)
    model = onnx.load(str(root / "backbone.onnx"))
    keep = [o for o in model.graph.output if o.name == "logits"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(root / "backbone.onnx"))
    b = Bundle.load(root, verify=False)
    spec = b.spec.model_copy(update={"backbone": b.spec.backbone.model_copy(
        update={"onnx": artifact(root, "backbone.onnx"), "features_output": None})})
    Bundle(root, spec).save()
    backend = OnnxBackend(Bundle.load(root))
    with pytest.raises(ValueError, match="no features output"):
        OnnxClassifier(backend).features(torch.zeros(1, 1, 28, 28))
