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
    pixels under the same name: ``(x - mean) / std`` per channel in front (models/client_values.py)."""
    c = len(mean)

    def normalize(outer: str, inner: str, fresh):
        m, s, centred = fresh("mean"), fresh("std"), fresh("centred")
        inits = [helper.make_tensor(m, TensorProto.FLOAT, [1, c, 1, 1], list(mean)),
                 helper.make_tensor(s, TensorProto.FLOAT, [1, c, 1, 1], list(std))]
        nodes = [helper.make_node("Sub", [outer, m], [centred], name=fresh("normalize_sub")),
                 helper.make_node("Div", [centred, s], [inner], name=fresh("normalize_div"))]
        return nodes, inits

    return checked(prepend(model, input_name, "normalized", normalize))


def reverse_channels_front(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """``model`` (its input ``input_name`` ``[N, 3, H, W]`` in BGR order) -> the same model taking RGB
    under the same name: one ``Gather`` of the channels 2, 1, 0 in front (models/client_values.py)."""
    def reverse(outer: str, inner: str, fresh):
        order = fresh("order")
        init = helper.make_tensor(order, TensorProto.INT64, [3], [2, 1, 0])
        return [helper.make_node("Gather", [outer, order], [inner], axis=1, name=fresh("to_bgr"))], [init]

    return checked(prepend(model, input_name, "bgr", reverse))


UINT8_ROUND = "robustgate_uint8_round"  # the Floor of uint8_front; straight_through finds it by this name


def uint8_front(model: onnx.ModelProto, input_name: str, value_range: tuple[float, float]) -> onnx.ModelProto:
    """``model`` (its input ``input_name`` UINT8 levels 0..255) -> the same model taking FP32 pixels in
    ``value_range`` under the same name: in front, the pixels mapped onto the levels, clipped, rounded
    half up and cast (models/levels.py ``levels``, node for node: Sub, Mul, Max, Min, Add, Floor, Cast;
    Floor rather than Round and Max/Min rather than Clip exist at every opset). The torch twin is
    converted from :func:`straight_through` of the result."""
    from robustgate.models import levels

    lo, _ = value_range

    def quantize(outer: str, inner: str, fresh):
        consts = {tag: fresh(tag) for tag in ("lo", "scale", "zero", "top", "half")}
        values = {"lo": lo, "scale": levels.scale(value_range), "zero": 0.0, "top": float(levels.TOP), "half": 0.5}
        inits = [helper.make_tensor(consts[tag], TensorProto.FLOAT, [], [values[tag]]) for tag in consts]
        shifted, scaled, above, clipped, up, rounded = (
            fresh(t) for t in ("shifted", "scaled", "above", "clipped", "up", "rounded"))
        nodes = [helper.make_node("Sub", [outer, consts["lo"]], [shifted], name=fresh("sub")),
                 helper.make_node("Mul", [shifted, consts["scale"]], [scaled], name=fresh("mul")),
                 helper.make_node("Max", [scaled, consts["zero"]], [above], name=fresh("max")),
                 helper.make_node("Min", [above, consts["top"]], [clipped], name=fresh("min")),
                 helper.make_node("Add", [clipped, consts["half"]], [up], name=fresh("add")),
                 helper.make_node("Floor", [up], [rounded], name=UINT8_ROUND),
                 helper.make_node("Cast", [rounded], [inner], to=TensorProto.UINT8, name=fresh("to_uint8"))]
        return nodes, inits

    model = prepend(model, input_name, "uint8", quantize)
    next(v for v in model.graph.input if v.name == input_name).type.tensor_type.elem_type = TensorProto.FLOAT
    return checked(model)


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def straight_through(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with :func:`uint8_front` -> the same graph with the rounding passed straight through
    (the levels stay floats: the clipping, the +0.5 and the Floor become one Identity of the scaled
    pixels, the Cast to UINT8 casts to FP32), for the torch twin: rounding has a zero gradient almost
    everywhere, which would silently stop every gradient attack; straight through is BPDA's answer
    (Athalye et al., ICML 2018). The clipping goes too: pixels in the value range need none, and at
    its ends torch splits a tie's gradient in half. The twin answers what the model does on pixels
    that lie on the levels (the import checks it). ``model`` is returned as is when it has no such
    front.

    :class:`ValueError` when the model reads its UINT8 input other than by casting it to floats
    (a quantized model's integer arithmetic, say): then the straight-through graph would not compute
    what the model does, and the twin must not exist."""
    if not any(n.name == UINT8_ROUND for n in model.graph.node):
        return model
    model = copy.deepcopy(model)
    g = model.graph
    floor = next(n for n in g.node if n.name == UINT8_ROUND)
    cast = next(n for n in g.node if n.op_type == "Cast" and floor.output[0] in n.input)
    held = _uint8_values(g, cast.output[0])
    producer = {o: n for n in g.node for o in n.output}
    for op in ("Add", "Min", "Max"):  # the +0.5 and the clipping, from the Floor back to the Mul
        node = producer.get(floor.input[0])
        if node is None or node.op_type != op:
            raise ValueError(f"{UINT8_ROUND!r} is not preceded by uint8_front's {op}: not a front robustgate wrote")
        floor.input[0] = node.input[0]
        g.node.remove(node)
    floor.op_type = "Identity"
    next(a for a in cast.attribute if a.name == "to").i = TensorProto.FLOAT
    for graph in _graphs(g):
        for v in graph.value_info:
            if v.name in held:
                v.type.tensor_type.elem_type = TensorProto.FLOAT
    return checked(model)


# what a model may do to its UINT8 input before casting it to floats: move the levels, not compute on
# them (each is the same on floats holding the levels, and passes a gradient through)
# (their other inputs, if any, are int64 shapes or indices, never UINT8 values that would stay UINT8)
_MOVES = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                    "Expand", "Tile", "Gather"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # read the shape alone


def _uint8_values(g, name: str) -> set[str]:
    """The values that hold the UINT8 input ``name``'s levels up to the model's casts to floats: ``name``
    and what only moves it (``_MOVES``, as their data input). ValueError when any other node reads one."""
    held, todo = {name}, [name]
    while todo:
        value = todo.pop()
        for graph in _graphs(g):
            for n in graph.node:
                if value not in n.input:
                    continue
                to = next((a.i for a in n.attribute if a.name == "to"), None)
                if n.op_type in _SHAPE_ONLY or (n.op_type == "Cast" and to in _FLOAT_TYPES):
                    continue
                if n.op_type in _MOVES and n.input[0] == value:
                    todo += [o for o in n.output if o and o not in held]
                    held.update(n.output)
                    continue
                raise ValueError(f"the model reads its UINT8 input with {n.op_type} {n.name!r} (not only moving it "
                                 f"and casting it to floats): its rounding cannot be passed straight through")
    return held


def computes_in_fp16(model: onnx.ModelProto) -> bool:
    """Whether the model takes or answers FP16, holds FP16 weights, or casts to FP16 (after
    :func:`float32_edges` only the last two show)."""
    f16, g = TensorProto.FLOAT16, model.graph
    return (any(v.type.tensor_type.elem_type == f16 for v in (*g.input, *g.output))
            or any(t.data_type == f16 for t in g.initializer)
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in g.node))


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


def free_batch(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """A model exported with a fixed batch of 1 -> the same graph declaring a dynamic batch (``batch``)
    as the first dimension of its input and of its outputs that had 1 there. A ``Reshape`` whose
    data carries that batch first (by shape inference) and whose constant target shape starts with
    the baked-in 1 gets 0 there instead ("as the input's first dimension": the same at batch 1), or
    -1 under ``allowzero`` when no other dimension is -1.
    The shapes recorded for intermediate values (value_info: hints with the batch baked in) are
    dropped. Whatever else baked the batch in is left: the caller checks that every item gets what
    the model as exported gives it, alone and in a batch (models/importer.py)."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    g = model.graph
    for v in (*[i for i in g.input if i.name == input_name], *g.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del g.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph onnx cannot infer: its reshapes stay, the caller's check decides
        return checked(model)
    batched = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input)
               if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param == "batch"}
    consts = {t.name: t for t in g.initializer}
    consts.update({n.output[0]: a.t for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    fresh = _namer(model, "batch_shape")
    for node in g.node:
        if node.op_type != "Reshape" or node.input[0] not in batched or node.input[1] not in consts:
            continue
        target = numpy_helper.to_array(consts[node.input[1]])
        if target.ndim != 1 or not target.size or target[0] != 1:
            continue
        target = target.copy()
        if any(a.name == "allowzero" and a.i for a in node.attribute):  # 0 means a zero-sized dimension there
            if (target == -1).any():
                continue  # -1 is taken: left to the caller's check
            target[0] = -1  # the only unknown: the batch, as the rest of the shape is given
        else:
            target[0] = 0
        name = fresh("0")
        g.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
    return checked(model)


def flatten_output(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """``model`` whose output ``output`` is ``[N, K, 1, ...]`` (a classifier ending in a 1x1 convolution
    and global pooling, as older exports do) -> the same values as ``[N, K]``, under the same name."""
    def flatten(raw: str, out: str, fresh):
        return [helper.make_node("Flatten", [raw], [out], axis=1, name=fresh("flatten"))], []

    model = append(model, output, "unflattened", flatten)
    dims = next(v for v in model.graph.output if v.name == output).type.tensor_type.shape.dim
    del dims[2:]
    return checked(model)
