"""The torch twin of a bundle's backbone: the same weights as the ONNX graph, differentiable.

``load_backbone(bundle)`` builds the twin ``bundle.yaml`` declares (``backbone.twin``,
models/bundle.py):

- ``arch`` (bundles written by ``robustgate train``): rebuilds the architecture
  (``backbone.arch`` with ``backbone.arch_kwargs``) and loads the safetensors state dict (checksum
  already verified by ``Bundle.load``), strictly: a missing or unexpected key fails. The export's
  parity check guarantees it computes what the served ONNX graph computes.
- ``onnx`` (bundles written by ``robustgate import``): converts the bundle's own ONNX file with
  onnx2torch (:func:`convert_onnx`) into an :class:`OnnxTwin`. The ONNX file is the twin's only
  source -- no second copy of the weights that could drift from the served graph, and no pickle;
  the conversion is deterministic (the weights are the graph's initializers). ``robustgate
  import`` checked the converted module against ONNX Runtime and recorded the result in
  ``backbone.twin_parity``. For a model whose output holds probabilities, the converted graph is
  the one ONNX Runtime runs, their logarithms appended (models/output_kind.py); for a model that
  computes in FP16, that graph in FP32; for a model that takes UINT8 levels, its rounding passed
  straight through (:func:`twin_graph`).
- ``none``: raises :class:`NoTwin` (only attacks that need no gradient apply to such a bundle).

``TorchClassifier(module)`` adapts a twin to :class:`robustgate.defenses.base.Classifier`. It does
not disable gradients (adaptive attacks differentiate through detectors that query it); wrap
calls in ``torch.no_grad()`` when gradients are not wanted.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from robustgate.models.archs import build_arch
from robustgate.models.bundle import Bundle, BundleError

# onnx2torch 1.5 implements each operator up to this opset; a newer graph (torch's exporter writes
# opset 18-20) is first brought down to it by onnx's version converter
ONNX2TORCH_OPSET = 17

log = logging.getLogger(__name__)


class NoTwin(BundleError):
    """The bundle's backbone has no torch twin: only attacks that need no gradient apply to it."""


class Unconvertible(ValueError):
    """onnx2torch cannot turn this ONNX graph into a torch module; the message says why."""


def has_twin(bundle: Bundle) -> bool:
    """Whether :func:`load_backbone` can build a differentiable twin of the bundle's backbone."""
    return bundle.spec.backbone.twin_kind() != "none"


def load_backbone(bundle: Bundle | str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Bundle (or its directory) -> the eval-mode ``nn.Module`` twin on ``device``; :class:`NoTwin`
    when the bundle has none. The module maps ``[N, C, H, W]`` pixels to logits ``[N, K]`` and has
    ``features(x) -> [N, D]``."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    spec = bundle.spec.backbone
    kind = spec.twin_kind()
    if kind == "none":
        why = spec.twin_note or "the backbone has no safetensors weights and no convertible ONNX file"
        raise NoTwin(f"{bundle.root}: the backbone has no torch twin ({why}); only attacks that need no "
                     f"gradient (transfer from a surrogate bundle, Square) apply to it")
    if kind == "onnx":
        from robustgate.models.output_kind import backbone_model

        path = bundle.onnx_path()
        try:  # the graph ONNX Runtime runs: log-probabilities for a model that answers probabilities
            module = convert_onnx(twin_graph(backbone_model(bundle)))
        except Unconvertible as exc:  # recorded as convertible at import: another onnx2torch version?
            raise NoTwin(f"{bundle.root}: {path.name} no longer converts to torch: {exc}") from exc
        checked = (spec.twin_parity or {}).get("converter")
        current = f"onnx2torch {onnx2torch_version()}"
        if checked and checked != current:
            log.warning("%s: the twin was checked against ONNX Runtime with %s at import; this is %s "
                        "(re-import to check it again)", bundle.root, checked, current)
        try:
            twin = OnnxTwin(module, onnx_output_names(path), spec.logits_output, spec.features_output)
        except ValueError as exc:
            raise BundleError(f"{bundle.root}: {exc}") from exc
        return twin.to(device).eval()
    try:
        module = build_arch(spec.arch, **spec.arch_kwargs)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.root}: cannot build backbone.arch {spec.arch!r} with {spec.arch_kwargs}: {exc}") from exc
    state = load_file(str(bundle.path(spec.weights)), device="cpu")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.root}: {spec.weights.path} does not fit {spec.arch}: {exc}") from exc
    return module.to(device).eval()


def twin_graph(model):
    """The ONNX graph the twin is converted from: the served one, in FP32 when it computes in FP16
    (models/graph_edit.py ``float32_inside``: FP16 gradients underflow), with the rounding onto UINT8
    levels in front of a model that takes them passed straight through (``straight_through``: its
    gradient is zero). :class:`Unconvertible` when that cannot be done faithfully."""
    from robustgate.models.graph_edit import computes_in_fp16, float32_inside, straight_through

    if computes_in_fp16(model):
        model = float32_inside(model)
    try:
        return straight_through(model)
    except ValueError as exc:
        raise Unconvertible(str(exc)) from exc


def onnx2torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnx2torch")
    except PackageNotFoundError:
        return "unknown"


def onnx_output_names(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _inline_identity_initializers(model) -> None:
    """Replaces each ``Identity`` node whose input is an initializer (and whose output is not a graph
    output) by a copy of that initializer named as its output: the same values, no node."""
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias = copy.deepcopy(inits[node.input[0]])
            alias.name = node.output[0]
            model.graph.initializer.append(alias)
            inits[alias.name] = alias
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def convert_onnx(model: "onnx.ModelProto") -> nn.Module:
    """ONNX graph -> torch ``GraphModule`` (onnx2torch) returning the graph's outputs in order (a
    tensor for one output, a list for several). :class:`Unconvertible` when it cannot.

    Two rewrites first, on a copy, each exact for the inputs the proxy serves:

    - ``Reshape(allowzero=1)`` (torch's exporter writes it; onnx2torch refuses it) loses the
      attribute when its target shape is a constant holding no 0, or is computed at run time: then
      a 0 could only come from a zero-sized dimension, and batches are never empty;
    - ``Identity`` of an initializer (torch's TorchScript exporter writes one where two parameters
      are equal, e.g. the conv biases of a torchvision ResNet after BatchNorm folding; onnx2torch
      wants a Conv's weights and bias to be initializers) becomes a copy of that initializer under
      the Identity's output name;
    - a graph newer than opset 17 whose operators onnx2torch does not implement at that version
      is converted down to opset 17 with ``onnx.version_converter`` (e.g. ReduceMean-18, whose
      axes became an input).
    """
    import onnx
    import onnx2torch
    from onnx import numpy_helper, version_converter

    model = copy.deepcopy(model)
    _drop_allowzero(model, onnx, numpy_helper)
    _inline_identity_initializers(model)
    try:
        return onnx2torch.convert(model)
    except NotImplementedError as first:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None or opset <= ONNX2TORCH_OPSET:
            raise Unconvertible(str(first)) from first
        try:
            older = version_converter.convert_version(model, ONNX2TORCH_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors from C++
            raise Unconvertible(f"{first}; converting the graph from opset {opset} down to "
                                f"{ONNX2TORCH_OPSET} failed too: {exc}") from exc
        _drop_allowzero(older, onnx, numpy_helper)
        try:
            return onnx2torch.convert(older)
        except NotImplementedError as exc:
            raise Unconvertible(f"{exc} (after converting opset {opset} down to {ONNX2TORCH_OPSET})") from exc
        except Exception as exc:  # onnx2torch raises assorted errors on graphs it half-supports
            raise Unconvertible(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise Unconvertible(f"{type(exc).__name__}: {exc}") from exc


def _drop_allowzero(model, onnx, numpy_helper) -> None:
    constants = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    constants[node.output[0]] = a.t
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        for a in list(node.attribute):
            if a.name == "allowzero" and a.i == 1:
                shape = constants.get(node.input[1])
                if shape is not None and (numpy_helper.to_array(shape) == 0).any():
                    raise Unconvertible(f"Reshape {node.name!r} has allowzero=1 and a 0 in its target shape; "
                                        f"onnx2torch cannot express it")
                node.attribute.remove(a)


class OnnxTwin(nn.Module):
    """A converted ONNX graph as a backbone: ``forward(x)`` ``[N, C, H, W]`` -> logits ``[N, K]``,
    ``features(x)`` -> ``[N, D]`` (the graph's features output, flattened per item)."""

    def __init__(self, graph: nn.Module, output_names: list[str], logits_output: str,
                 features_output: str | None = None):
        super().__init__()
        if logits_output not in output_names:
            raise ValueError(f"logits output {logits_output!r} is not among the graph's outputs {output_names}")
        if features_output is not None and features_output not in output_names:
            raise ValueError(f"features output {features_output!r} is not among the graph's outputs {output_names}")
        self.graph = graph
        self.output_names = list(output_names)
        self.logits_output, self.features_output = logits_output, features_output
        self._logits_index = self.output_names.index(logits_output)
        self._features_index = None if features_output is None else self.output_names.index(features_output)

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.graph(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        return self.outputs(x)[self._logits_index]

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, D]
        if self._features_index is None:
            raise ValueError(f"the backbone has no features output (outputs: {self.output_names}); "
                             f"import it with --features-output NAME")
        return self.outputs(x)[self._features_index].reshape(x.shape[0], -1)


class TorchClassifier:
    """A torch backbone as a ``Classifier``: ``logits(x) -> [N, K]``, ``features(x) -> [N, D]``.

    ``x`` is ``[N, C, H, W]`` raw pixels; it is moved to the module's device and the outputs are
    returned on ``x``'s device.
    """

    def __init__(self, module: nn.Module):
        if not hasattr(module, "features"):
            raise ValueError(f"{type(module).__name__} has no features(x); every robustgate backbone needs one")
        self.module = module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        return self.module(x.to(self.device)).to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, D]
        return self.module.features(x.to(self.device)).to(x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)
