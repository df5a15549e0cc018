"""A model directory of a Triton model repository as an import source (``robustgate import
--triton-model DIR``): what Triton already knows about the model, read from its ``config.pbtxt``.

A team that serves its classifier with Triton has it as ``<repository>/<model>/config.pbtxt`` and
``<repository>/<model>/<version>/model.onnx``. :func:`read_model_dir` picks the version file (the
highest numbered version directory holding it, as Triton's default ``latest`` policy serves, or the
one asked for) and reads from the configuration what the ONNX graph may not say:

- the input's ``format`` (``FORMAT_NHWC`` / ``FORMAT_NCHW``): the layout (``--layout``);
- its ``dims`` (without the batch axis when ``max_batch_size`` > 0): the per-item shape, which a graph
  exported with dynamic H/W leaves open (``--input-shape``); a static axis of the graph that the dims
  contradict is refused;
- the output with a ``label_filename``: the logits output (``--logits-output``) and the class names,
  one per line of that file in the model directory (``--classes``);
- ``name``: the served name (``--name``).

The configuration is parsed with Triton's own ``ModelConfig`` message (tritonclient's
``model_config_pb2``, text format), so a field this module does not read is still checked for
spelling. Only ONNX models import (``platform: onnxruntime_onnx`` or ``backend: onnxruntime``); for any
other the error names ``--upstream``, which reads a running server's metadata instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from robustgate.models.bundle import sha256_file

ONNX_PLATFORMS = ("onnxruntime_onnx",)
ONNX_BACKENDS = ("onnxruntime",)
DEFAULT_FILE = "model.onnx"


@dataclass(frozen=True)
class TritonModel:
    """What :func:`read_model_dir` found: the ONNX file to import and the configuration's answers
    (None where the configuration says nothing)."""

    name: str
    onnx: Path
    version: str
    config: Path
    config_sha256: str
    layout: str | None = None
    input_shape: tuple[int, int, int] | None = None  # (C, H, W)
    logits_output: str | None = None
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _config(path: Path):
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # tritonclient is in robustgate[attack]
        raise ValueError(f"reading {path} needs tritonclient (pip install 'tritonclient[grpc]'): {exc}") from exc
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a Triton model configuration: {exc}") from exc


def _version(model_dir: Path, filename: str, version: str) -> tuple[str, Path]:
    if version:
        path = model_dir / version / filename
        if not path.exists():
            raise ValueError(f"{model_dir}: version {version} has no {filename} ({path})")
        return version, path
    versions = sorted((int(p.name), p) for p in model_dir.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / filename).exists())
    if not versions:
        raise ValueError(f"{model_dir}: no version directory holds {filename} (Triton's layout: "
                         f"{model_dir.name}/<version>/{filename})")
    number, directory = versions[-1]
    return str(number), directory / filename


def _graph_dims(onnx_file: Path, input_name: str | None) -> list[int | None] | None:
    """The graph input's dims (None for a dynamic axis), without loading external weights; None when
    the file is not readable here (the importer reports that)."""
    import onnx

    try:
        model = onnx.load(str(onnx_file), load_external_data=False)
    except Exception:  # noqa: BLE001 - the importer's own load names the problem
        return None
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    chosen = next((i for i in inputs if i.name == input_name), inputs[0] if len(inputs) == 1 else None)
    if chosen is None:
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in chosen.type.tensor_type.shape.dim]


def read_model_dir(model_dir: str | Path, version: str = "") -> TritonModel:
    """``model_dir`` (``<repository>/<model>``) -> :class:`TritonModel`; ValueError with one message
    when it is not an ONNX model of a Triton repository or its configuration contradicts the graph."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise ValueError(f"{model_dir}: not a Triton model directory (no config.pbtxt)")
    cfg = _config(config_path)
    if cfg.platform not in ONNX_PLATFORMS and cfg.backend not in ONNX_BACKENDS:
        kind = cfg.platform or cfg.backend or "unset"
        raise ValueError(f"{config_path}: platform/backend {kind!r} is not ONNX; export the model to ONNX, or import "
                         f"it from the running server: robustgate import --upstream HOST:PORT --model "
                         f"{cfg.name or model_dir.name}")
    filename = cfg.default_model_filename or DEFAULT_FILE
    version, onnx_file = _version(model_dir, filename, version)
    if onnx_file.is_dir():  # Triton's directory form of an ONNX model (model.onnx/model.onnx + its external data)
        onnx_file = onnx_file / DEFAULT_FILE
    notes = [f"read from {config_path}: version {version} ({onnx_file.relative_to(model_dir)})"]
    if len(cfg.input) != 1:
        raise ValueError(f"{config_path}: {len(cfg.input)} inputs; robustgate serves classifiers of one image input")
    inp = cfg.input[0]
    fmt = model_config_format(inp.format)
    layout = {"FORMAT_NHWC": "NHWC", "FORMAT_NCHW": "NCHW"}.get(fmt)
    if layout:
        notes.append(f"input {inp.name!r} is {fmt}: layout {layout}")
    dims = list(inp.dims)
    if cfg.max_batch_size == 0 and dims:  # no implicit batch axis: the first dim is the batch
        dims = dims[1:]
    input_shape = None
    if len(dims) == 3 and all(d > 0 for d in dims) and layout is not None:
        input_shape = (dims[2], dims[0], dims[1]) if layout == "NHWC" else (dims[0], dims[1], dims[2])
        graph = _graph_dims(onnx_file, inp.name)
        if graph is not None and len(graph) == 4:
            for axis, (g, d) in enumerate(zip(graph[1:], dims), start=1):
                if g is not None and g != d:
                    raise ValueError(f"{config_path}: input {inp.name!r} dims {list(inp.dims)} contradict the graph's "
                                     f"axis {axis} = {g} ({onnx_file})")
        notes.append(f"per-item shape (C, H, W) {input_shape} from the configuration's dims")
    logits_output, classes = None, None
    labelled = [o for o in cfg.output if o.label_filename]
    if len(labelled) > 1:
        raise ValueError(f"{config_path}: {len(labelled)} outputs have a label_filename; name the logits with "
                         f"--logits-output and the classes with --classes")
    if labelled:
        out = labelled[0]
        label_file = model_dir / out.label_filename
        if not label_file.is_file():
            raise ValueError(f"{config_path}: output {out.name!r} names label_filename {out.label_filename!r}, which "
                             f"is not in {model_dir}")
        logits_output = out.name
        classes = [line.strip() for line in label_file.read_text().splitlines() if line.strip()]
        notes.append(f"logits output {out.name!r} and {len(classes)} class names from {out.label_filename}")
    return TritonModel(name=cfg.name or model_dir.name, onnx=onnx_file, version=version, config=config_path,
                       config_sha256=sha256_file(config_path), layout=layout,
                       input_shape=input_shape, logits_output=logits_output, classes=classes, notes=notes)


def model_config_format(value: int) -> str:
    """The name of a ``ModelInput.Format`` value (``FORMAT_NONE`` for 0)."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.ModelInput.Format.Name(value)
