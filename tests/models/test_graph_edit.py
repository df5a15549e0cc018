"""models/graph_edit.py: steps in front of an input and after an output under the model's own
names, and an FP16 graph widened to FP32 for the torch twin."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from robustgate.models.graph_edit import float32_edges, float32_inside, normalize_front


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def half_model() -> onnx.ModelProto:
    """``x`` [N, 2, 2, 2] FP16 -> ``y = x * w + c`` (an FP16 weight and a Constant) and ``z = Cast<fp16>(y)
    + y`` (a reader of ``y`` inside the graph), both outputs FP16."""
    w = numpy_helper.from_array(np.array([[[[0.5]], [[2.0]]]], dtype=np.float16), "w")
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(0.25, np.float16), "c")),
             helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"]),
             helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["y16", "y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 2, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 2, 2, 2]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["N", 2, 2, 2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float32_edges_and_float32_inside_keep_the_computation():
    model = half_model()
    x = np.random.default_rng(0).random((3, 2, 2, 2), dtype=np.float32)
    want = run(model, x.astype(np.float16))
    edged = float32_edges(model, "x", ["y", "z"])
    assert edged.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {o.type.tensor_type.elem_type for o in edged.graph.output} == {TensorProto.FLOAT}
    got = run(edged, x)
    for k in ("y", "z"):
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want[k].astype(np.float32), atol=2e-3)
    wide = float32_inside(edged)
    assert not any(t.data_type == TensorProto.FLOAT16 for t in wide.graph.initializer)
    assert not any(a.name == "to" and a.i == TensorProto.FLOAT16 for n in wide.graph.node for a in n.attribute)
    exact = run(wide, x)  # FP32 throughout: the FP16 model's computation without its rounding
    np.testing.assert_allclose(exact["y"], x * np.array([0.5, 2.0], np.float32)[None, :, None, None] + 0.25,
                               rtol=1e-6)
    np.testing.assert_allclose(exact["z"], 2 * exact["y"], rtol=1e-6)
    np.testing.assert_allclose(exact["z"], want["z"].astype(np.float32), atol=1e-2)


def test_normalize_front_takes_pixels_under_the_input_name():
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    front = normalize_front(model, "x", (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert [i.name for i in front.graph.input] == ["x"]
    x = np.array([[[[1.0]], [[0.25]], [[1.0]]]], dtype=np.float32)
    np.testing.assert_allclose(run(front, x)["y"].ravel(), [1.0, 0.0, 0.5])


def reshape_model(target: list[int], allowzero: int) -> onnx.ModelProto:
    """``x`` [1, 2, 3] -> Reshape(x, target) -> ``y``, the batch of 1 baked into the target."""
    shape = numpy_helper.from_array(np.array(target, dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_free_batch_declares_a_dynamic_batch_and_frees_the_reshapes_that_baked_it_in():
    from robustgate.models.graph_edit import free_batch

    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    for target, allowzero in (([1, 6], 0), ([1, -1], 0), ([1, 6], 1)):
        freed = free_batch(reshape_model(target, allowzero), "x")
        assert freed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert freed.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        np.testing.assert_array_equal(run(freed, x)["y"], x.reshape(4, 6))  # each item flattened by itself
    kept = free_batch(reshape_model([1, -1], 1), "x")  # under allowzero, -1 is taken and 0 means 0: left
    np.testing.assert_array_equal(numpy_helper.to_array(kept.graph.initializer[0]), [1, -1])


def levels_model(opset: int = 9) -> onnx.ModelProto:
    """``x`` [N, 1, 2, 3] UINT8, moved (Transpose) and cast to floats: ``y`` = the levels as FP32 [N, 3, 1, 2]."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 1, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 2])],
                              value_info=[helper.make_tensor_value_info("t", TensorProto.UINT8, ["N", 3, 1, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (0.0, 255.0), (-1.0, 1.0)])
def test_uint8_front_rounds_as_models_levels_does_and_straight_through_keeps_the_floats(value_range):
    """uint8_front (opset 9: no Round, no Clip inputs) maps pixels onto the levels exactly as
    models/levels.py does, ties and out-of-range values included; straight_through of it gives the
    scaled pixels themselves, and retypes what only moves the levels."""
    from robustgate.models import levels
    from robustgate.models.graph_edit import straight_through, uint8_front

    lo, hi = value_range
    k = np.arange(256, dtype=np.float32)
    ties = lo + (k[:255] + 0.5) * (hi - lo) / 255  # halfway between two levels: rounded up
    x = np.concatenate([lo + k * (hi - lo) / 255, ties, [lo - 1, hi + 1, lo + 1e-3]]).astype(np.float32)
    x = np.resize(x, (len(x) // 6 + 1) * 6).reshape(-1, 1, 2, 3)
    front = uint8_front(levels_model(), "x", value_range)
    want = levels.levels(x, value_range).transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(run(front, x)["y"], want)
    through = straight_through(front)
    ops = {n.op_type for n in through.graph.node}
    assert "Identity" in ops and not ops & {"Floor", "Max", "Min", "Add"}
    assert next(v for v in through.graph.value_info if v.name == "t").type.tensor_type.elem_type == TensorProto.FLOAT
    scaled = ((x - np.float32(lo)) * np.float32(levels.scale(value_range))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(run(through, x)["y"], scaled, rtol=1e-6)
    assert straight_through(levels_model()).graph == levels_model().graph  # no front: as is


def test_straight_through_refuses_a_graph_that_computes_on_its_levels():
    from robustgate.models.graph_edit import straight_through, uint8_front

    model = levels_model(17)
    model.graph.node[1].attribute[0].i = TensorProto.INT32  # integer arithmetic on the levels
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT32
    with pytest.raises(ValueError, match="reads its UINT8 input with Cast"):
        straight_through(uint8_front(model, "x", (0.0, 1.0)))
