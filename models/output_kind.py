"""A backbone whose output holds probabilities: one conversion at the boundary, logits inside.

robustgate's pipeline reads the backbone's output as logits: ensembles average ``softmax(logits)``,
MagNet's ``jsd`` criterion compares ``softmax(logits / T)``, the white-box red team's losses take
``cross_entropy(logits, y)``, the output policies take a softmax. A model that ends in a softmax (as
Keras classifiers usually do; ``backbone.output_kind: probabilities``, recorded by ``robustgate
import``) gives probabilities ``p`` instead, and every one of those would read them wrongly (a softmax
of probabilities flattens them: 0.99 becomes about 0.23 over 10 classes).

So the model is converted once, where its output enters robustgate, into ``log p`` -- logits of the
same distribution (``softmax(log p) = p`` for a row that sums to 1), on which all of the above are
right as they stand:

- in process (ONNX Runtime, the fused pass, the torch twin that ``fit`` and the red team
  differentiate): :func:`backbone_model` appends ``Max(p, FLOOR)`` and ``Log`` to the graph's logits
  output when the bundle is loaded, under the same output name, so the ONNX Runtime session and the
  onnx2torch twin are built from one graph. The file in the bundle stays the user's model (its
  sha256 is the one they know);
- from an upstream model server: :func:`to_logits` on each answer (proxy/backends/upstream.py);
- back to the client: :func:`to_probabilities` where the answer leaves under the ``logits`` output
  policy (proxy/verdicts.py), so clients get the probabilities they get from the model today.

``FLOOR`` is float32's smallest normal number: an exact 0 (a saturated softmax) becomes
``log FLOOR`` (about -87.3), a finite logit whose softmax term is 0 in float32, instead of ``-inf``,
which would turn differences and gradients into NaN; :func:`to_probabilities` maps it back to 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from robustgate.models.bundle import Bundle

FLOOR = float(np.finfo(np.float32).tiny)  # 1.18e-38
LOG_FLOOR = float(np.log(np.float32(FLOOR)))  # -87.34
# a logit at or below this is the floor, give or take the rounding of whatever averaged it (an
# ensemble's log of mean probabilities): exp of it is a probability of 0
_ZERO_BELOW = np.float32(LOG_FLOOR + 1e-2)


def reads_probabilities(bundle: "Bundle") -> bool:
    """Whether ``bundle``'s backbone output holds probabilities (``backbone.output_kind``)."""
    return bundle.spec.backbone.output_kind == "probabilities"


def log_output(model: "onnx.ModelProto", output: str) -> "onnx.ModelProto":
    """``model`` with its output ``output`` (probabilities) replaced by ``log(max(p, FLOOR))`` under the
    same name; the other outputs (features), and nodes inside the graph that read the probabilities,
    untouched. A copy: ``model`` is not changed."""
    from onnx import TensorProto, helper

    from robustgate.models.graph_edit import append

    def log(raw: str, out: str, fresh):
        floor, clamped = fresh("floor"), fresh("clamped")
        return ([helper.make_node("Max", [raw, floor], [clamped], name=fresh("floor_max")),
                 helper.make_node("Log", [clamped], [out], name=fresh("log"))],
                [helper.make_tensor(floor, TensorProto.FLOAT, [], [FLOOR])])

    return append(model, output, "probabilities", log)


def backbone_model(bundle: "Bundle") -> "onnx.ModelProto":
    """The graph every in-process consumer of ``bundle``'s backbone runs: its ONNX file, with
    :func:`log_output` applied when the output holds probabilities."""
    import onnx

    model = onnx.load(str(bundle.onnx_path()))
    if reads_probabilities(bundle):
        model = log_output(model, bundle.spec.backbone.logits_output)
    return model


def backbone_source(bundle: "Bundle") -> str | bytes:
    """What ONNX Runtime loads for ``bundle``'s backbone: the file's path (the usual case: no copy of
    the graph in memory), or the serialized :func:`backbone_model` when the output holds probabilities."""
    if reads_probabilities(bundle):
        return backbone_model(bundle).SerializeToString()
    return str(bundle.onnx_path())


def to_logits(p: np.ndarray) -> np.ndarray:
    """``[N, K]`` probabilities -> float32 ``log(max(p, FLOOR))`` (an upstream's answer, at the boundary).
    NaN stays NaN."""
    return np.log(np.maximum(np.asarray(p, dtype=np.float32), np.float32(FLOOR)))


def to_probabilities(z: np.ndarray) -> np.ndarray:
    """The inverse for the client: float32 ``exp(z)``, 0 where ``z`` is at the floor. NaN stays NaN."""
    z = np.asarray(z, dtype=np.float32)
    p = np.exp(z)
    p[z <= _ZERO_BELOW] = 0.0
    return p
