"""models/output_kind.py: the log appended to a probabilities output, and its inverse for the client."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from robustgate.models.output_kind import FLOOR, LOG_FLOOR, log_output, to_logits, to_probabilities


def softmax_graph() -> onnx.ModelProto:
    """``x`` [N, 3] -> ``probs = Softmax(x)`` and ``twice = probs + probs`` (a reader of the output
    inside the graph), both graph outputs."""
    nodes = [helper.make_node("Softmax", ["x"], ["probs"], axis=1),
             helper.make_node("Add", ["probs", "probs"], ["twice"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def test_log_output_replaces_the_output_under_its_name_and_leaves_the_rest():
    model = softmax_graph()
    x = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 200.0]], dtype=np.float32)  # the second row saturates to 0, 0, 1
    before = run(model, x)
    got = run(log_output(model, "probs"), x)
    onnx.checker.check_model(log_output(model, "probs"), full_check=True)
    p = before["probs"]
    assert p[1, 0] == 0.0  # an exact zero ...
    np.testing.assert_allclose(got["probs"], np.log(np.maximum(p, FLOOR)), rtol=1e-6)
    assert got["probs"][1, 0] == np.float32(LOG_FLOOR)  # ... becomes the finite floor, not -inf
    np.testing.assert_array_equal(got["twice"], before["twice"])  # readers inside keep the probabilities
    np.testing.assert_array_equal(run(model, x)["probs"], p)  # the model given is not changed
    np.testing.assert_allclose(to_probabilities(got["probs"]), p, rtol=1e-6, atol=0)
    assert to_probabilities(got["probs"])[1, 0] == 0.0


def test_log_output_refuses_a_name_that_is_not_an_output():
    with pytest.raises(ValueError, match="no output 'logits'"):
        log_output(softmax_graph(), "logits")


def test_to_logits_and_back_keep_nan_rows():
    p = np.array([[0.25, 0.75, 0.0], [np.nan, np.nan, np.nan]], dtype=np.float32)
    z = to_logits(p)
    assert z.dtype == np.float32 and np.isnan(z[1]).all() and np.isfinite(z[0]).all()
    back = to_probabilities(z)
    np.testing.assert_allclose(back[0], p[0], rtol=1e-6, atol=0)
    assert np.isnan(back[1]).all()
