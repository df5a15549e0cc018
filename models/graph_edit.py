"""Edits at the edges of a user's ONNX graph, under the names it already has: a step in front of
its input (the NHWC Transpose, a normalization, a cast to the model's precision) or after one of
its outputs (a cast back to FP32, the log of probabilities). The user's nodes and weights are
untouched; every node that read the edited name (subgraphs included) reads what it read before.

Written here because onnx's own helpers (``onnx.compose``) merge whole graphs by renaming, not
insert a step under an existing input or output name, which is what keeps a bundle's input and
output names the model's.
"""

from __future__ import annotations

import copy
from typing import Callable

import onnx
from onnx import TensorProto, helper

# build(outer, inner, fresh) -> (nodes, initializers): computes ``inner`` from ``outer``;
# fresh(tag) returns an unused name
Build = Callable[[str, str, Callable[[str], str]], tuple[list, list]]


def _graphs(graph):
    """The graph and every subgraph of its nodes' attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _namer(model: onnx.ModelProto, stem: str) -> Callable[[str], str]:
    g = model.graph
    taken = {v.name for v in (*g.input, *g.output, *g.value_info)} | {i.name for i in g.initializer}
    for graph in _graphs(g):
        taken |= {n for node in graph.node for n in (*node.input, *node.output, node.name)}

    def fresh(tag: str) -> str:
        name = f"{stem}_{tag}"
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    return fresh


def _edit(model: onnx.ModelProto, name: str, suffix: str, build: Build, front: bool) -> onnx.ModelProto:
    """A copy of ``model`` in which the nodes use ``<name>_<suffix>`` where they used ``name`` (as input,
    and, after an output, as output too), and a value_info entry for ``name`` moves with it; the nodes
    ``build(outer, inner, fresh)`` returns link the two: in front of the graph from the input ``name``
    to the inner name, or after it from the inner name to the output ``name``."""
    model = copy.deepcopy(model)
    g = model.graph
    fresh = _namer(model, name)
    inner = fresh(suffix)
    for graph in _graphs(g):
        for node in graph.node:
            node.input[:] = [inner if n == name else n for n in node.input]
            if not front:
                node.output[:] = [inner if n == name else n for n in node.output]
    for v in g.value_info:
        if v.name == name:
            v.name = inner
    nodes, inits = build(name, inner, fresh) if front else build(inner, name, fresh)
    for i, node in enumerate(nodes):
        g.node.insert(i if front else len(g.node), node)
    g.initializer.extend(inits)
    return model


def prepend(model: onnx.ModelProto, input_name: str, suffix: str, build: Build) -> onnx.ModelProto:
    """A copy of ``model`` in which every node that read the input ``input_name`` reads
    ``<input>_<suffix>`` instead, computed from the input by what ``build(input, inner, fresh)``
    returns. A shape some exporters record for the input in value_info moves to the inner name."""
    return _edit(model, input_name, suffix, build, front=True)


def append(model: onnx.ModelProto, output: str, suffix: str, build: Build) -> onnx.ModelProto:
    """A copy of ``model`` whose output ``output`` is computed by what ``build(raw, output, fresh)``
    returns from what the graph computed under that name, now called ``raw`` = ``<output>_<suffix>``
    (nodes inside the graph that read it keep reading it). ValueError when ``output`` is not an
    output."""
    if output not in [o.name for o in model.graph.output]:
        raise ValueError(f"the graph has no output {output!r} (outputs: {[o.name for o in model.graph.output]})")
    return _edit(model, output, suffix, build, front=False)


def nchw_front(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """``model`` (its input ``input_name`` ``[N, H, W, C]``) -> the same model taking ``[N, C, H, W]``
    under the same name: one ``Transpose`` (perm 0, 2, 3, 1) in front."""
    def transpose(outer: str, inner: str, fresh):
        return [helper.make_node("Transpose", [outer], [inner], perm=[0, 2, 3, 1], name=fresh("to_nhwc"))], []

    model = prepend(model, input_name, "nhwc", transpose)
    dims = next(v for v in model.graph.input if v.name == input_name).type.tensor_type.shape.dim
    nhwc = [copy.deepcopy(d) for d in dims]
    del dims[:]
    for axis in (0, 3, 1, 2):
        dims.add().CopyFrom(nhwc[axis])
    return checked(model)


def normalize_front(model: onnx.ModelProto, input_name: str, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> onnx.ModelProto:
    """``model`` (its input ``input_name`` ``[N, C, H, W]`` normalized values) -> the same model taking
    pixels under the same name: ``(x - mean) / std`` per channel in front (models/normalization.py)."""
    c = len(mean)

    def normalize(outer: str, inner: str, fresh):
        m, s, centred = fresh("mean"), fresh("std"), fresh("centred")
        inits = [helper.make_tensor(m, TensorProto.FLOAT, [1, c, 1, 1], list(mean)),
                 helper.make_tensor(s, TensorProto.FLOAT, [1, c, 1, 1], list(std))]
        nodes = [helper.make_node("Sub", [outer, m], [centred], name=fresh("normalize_sub")),
                 helper.make_node("Div", [centred, s], [inner], name=fresh("normalize_div"))]
        return nodes, inits

    return checked(prepend(model, input_name, "normalized", normalize))


def float32_edges(model: onnx.ModelProto, input_name: str, outputs: list[str]) -> onnx.ModelProto:
    """A model that computes in FP16 -> the same model taking FP32 under its input's name (a ``Cast``
    to FP16 in front, when the input is FP16) and giving FP32 under each name of ``outputs`` that is
    FP16 (a ``Cast`` after it)."""
    f16 = TensorProto.FLOAT16
    inp = next(v for v in model.graph.input if v.name == input_name)
    if inp.type.tensor_type.elem_type == f16:
        def down(outer: str, inner: str, fresh):
            return [helper.make_node("Cast", [outer], [inner], to=f16, name=fresh("to_fp16"))], []

        model = prepend(model, input_name, "fp16", down)
        next(v for v in model.graph.input if v.name == input_name).type.tensor_type.elem_type = TensorProto.FLOAT
    for name in outputs:
        out = next(v for v in model.graph.output if v.name == name)
        if out.type.tensor_type.elem_type != f16:
            continue

        def up(raw: str, outer: str, fresh):
            return [helper.make_node("Cast", [raw], [outer], to=TensorProto.FLOAT, name=fresh("to_fp32"))], []

        model = append(model, name, "fp16", up)
        next(v for v in model.graph.output if v.name == name).type.tensor_type.elem_type = TensorProto.FLOAT
    return checked(model)


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model)
    return model


def float32_inside(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model that computes in FP16 -> the same graph in FP32: FP16 weights, constants, casts and
    declared types made FP32. For the torch twin of an FP16 model (models/twin.py): the red team
    differentiates it, and FP16 gradients underflow to zero where a confident model's loss is flat,
    which would silently weaken every gradient attack; the FP32 graph answers what the FP16 one does
    to FP16's precision (the import checks it)."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT

    def widen(t: TensorProto) -> None:
        if t.data_type == f16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))

    for graph in _graphs(model.graph):
        for t in graph.initializer:
            widen(t)
        for v in (*graph.input, *graph.output, *graph.value_info):
            if v.type.tensor_type.elem_type == f16:
                v.type.tensor_type.elem_type = f32
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == f16:
                    attr.i = f32
                if attr.HasField("t"):
                    widen(attr.t)
                for t in attr.tensors:
                    widen(t)
    return checked(model)
