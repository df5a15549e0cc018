"""Fusing detectors' score graphs into the backbone's ONNX graph (one session call per batch).

A detector whose score is a function of the raw input alone and exists as an ONNX graph
(``Detector.onnx_score_model``: MagNet's reconstruction error) can run in the backbone's own
session: the fused model has the backbone's input, its outputs, and one ``[N]`` score output per
fused detector. A stateful stage's per-item embedding (``StatefulDetector.onnx_embedding_model``:
the k-NN method's encoder, defenses/stateful/knn.py) fuses the same way, as one ``[N, d]``
output. Where the pipeline classifies the raw input anyway (its shared pass,
defenses/pipeline.py) this spares the detector's separate session call, the copies in and out of
it and its torch glue: through the proxy the default pipeline's detection cost at batch 64 fell
from +24-45% to +19-20% (bench/results/detect.md). ONNX Runtime runs the fused graph's nodes one
after the other, each on the backbone session's intra-op threads. A fused detector fails with the
classify pass it is part of: the failure propagates as the backbone's would (an INTERNAL answer),
it is not absorbed by the pipeline's failure policy.

Written by hand because ``onnx.compose.merge_models`` chains a model's outputs into another's
inputs; here two graphs read one shared input side by side. Every name of a score graph (nodes,
values, initializers) is prefixed with its stage name, and its input renamed to the backbone's.
"""

from __future__ import annotations

import onnx

SCORE_OUTPUT_PREFIX = "robustgate_fused_score/"


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _at_opset(model: onnx.ModelProto, version: int, who: str) -> onnx.ModelProto:
    """``model`` as it reads at default-domain opset ``version``: itself when none of its operators was
    redefined between its opset and ``version``, else converted (onnx.version_converter)."""
    own = _default_opset(model)
    if own == version or all(onnx.defs.get_schema(n.op_type, own).since_version
                             == onnx.defs.get_schema(n.op_type, version).since_version for n in model.graph.node):
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises its own types; name the part
        raise ValueError(f"fuse: {who}'s graph (opset {own}) could not be converted to opset {version}: {exc}") from None


def fuse_score_graphs(backbone: onnx.ModelProto, scores: dict[str, onnx.ModelProto]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """-> (the fused model, stage name -> its output's name). ``backbone``: one input
    ``[N, C, H, W]``; each graph: one input of the same element type and item shape, one output
    ``[N]`` (a score) or ``[N, d]`` (an embedding), default-domain operators only, no subgraphs.
    Raises ValueError otherwise."""
    # one default-domain opset for the whole graph: the newest of the parts; a part written for an
    # older opset that uses an operator redefined since (the k-NN encoder's ReduceMean, whose axes
    # became an input in opset 18) is converted first (onnx.version_converter); the others' operators
    # mean the same at the newer opset (the checker below verifies the rest)
    versions = [_default_opset(backbone), *(_default_opset(m) for m in scores.values())]
    if len(set(versions)) > 1 and min(versions) < 13:
        raise ValueError(f"fuse: opsets {sorted(set(versions))} differ and one is below 13; re-export the graphs")
    version = max(versions)
    backbone = _at_opset(backbone, version, "the backbone")
    scores = {stage: _at_opset(m, version, stage) for stage, m in scores.items()}
    fused = onnx.ModelProto()
    fused.CopyFrom(backbone)
    g = fused.graph
    if len(g.input) != 1:
        raise ValueError(f"fuse: the backbone graph must have one input, it has {len(g.input)}")
    x = g.input[0]
    taken = {v.name for v in (*g.input, *g.output, *g.value_info)} | {i.name for i in g.initializer} \
        | {n for node in g.node for n in (*node.input, *node.output)}
    outputs: dict[str, str] = {}
    for stage, model in scores.items():
        sg = model.graph
        if len(sg.input) != 1 or len(sg.output) != 1:
            raise ValueError(f"fuse: {stage}'s score graph must have one input and one output")
        rank = len(sg.output[0].type.tensor_type.shape.dim)
        if sg.output[0].type.tensor_type.HasField("shape") and rank not in (1, 2):
            raise ValueError(f"fuse: {stage}'s graph must output [N] or [N, d], it outputs {_dims(sg.output[0])}")
        if sg.input[0].type.tensor_type.elem_type != x.type.tensor_type.elem_type or _dims(sg.input[0])[1:] != _dims(x)[1:]:
            raise ValueError(f"fuse: {stage}'s score graph reads {_dims(sg.input[0])}, the backbone {_dims(x)}")
        if any(o.domain not in ("", "ai.onnx") for o in model.opset_import):
            raise ValueError(f"fuse: {stage}'s score graph uses operators outside the default ONNX domain")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in sg.node for a in n.attribute):
            raise ValueError(f"fuse: {stage}'s score graph has subgraphs (If/Loop/Scan), which are not fused")
        prefix = f"{stage}/"
        inp = sg.input[0].name

        def rename(name: str) -> str:
            return name if name == "" else x.name if name == inp else prefix + name  # "" = an omitted optional input

        out = SCORE_OUTPUT_PREFIX + stage
        new_names = {rename(n) for n in (*(i.name for i in sg.initializer), *(o for nd in sg.node for o in nd.output))}
        if out in taken or new_names & taken:
            raise ValueError(f"fuse: names of {stage}'s score graph collide with the backbone's")
        taken |= new_names | {out}
        for init in sg.initializer:
            new = g.initializer.add()
            new.CopyFrom(init)
            new.name = rename(init.name)
        for node in sg.node:
            new = g.node.add()
            new.CopyFrom(node)
            new.input[:] = [rename(n) for n in node.input]
            new.output[:] = [rename(n) for n in node.output]
            new.name = prefix + node.name if node.name else ""
        for vi in sg.value_info:
            new = g.value_info.add()
            new.CopyFrom(vi)
            new.name = rename(vi.name)
        # the score graph's output becomes a fused output under a name the backbone cannot hold
        g.node.add().CopyFrom(onnx.helper.make_node("Identity", [rename(sg.output[0].name)], [out], name=prefix + "score_out"))
        o = g.output.add()
        o.CopyFrom(sg.output[0])
        o.name = out
        outputs[stage] = out
    for o in fused.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    onnx.checker.check_model(fused)
    return fused, outputs
