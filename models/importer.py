"""``robustgate import``: a user's own classifier -> a bundle the proxy serves and the toolchain reads.

Two sources:

- ``--onnx MODEL.onnx``: the input/output signature is read from the graph (onnx, then ONNX
  Runtime runs it); the file is copied into the bundle as ``backbone.onnx`` with its sha256; its
  torch twin (what ``fit`` and the red team differentiate) is the ONNX file converted by onnx2torch
  at load time (models/twin.py), checked here against ONNX Runtime on real inputs (``--dataset``
  / ``--data-dir``'s test split) or, without a dataset, on uniform random pixels in the value range
  -- the bundle records which, the largest differences and the tolerance. A graph onnx2torch cannot
  convert, or whose conversion disagrees with ONNX Runtime, still imports: ``backbone.twin`` is
  ``none`` and ``backbone.twin_note`` says why; the proxy serves it and stateless defenses apply.
- ``--upstream HOST:PORT --model NAME``: the signature is read from a running V2 server's
  ModelMetadata (Triton, KServe, MLServer; tritonclient.grpc). The bundle has no ONNX file and no
  twin, and is served with ``backend.kind: upstream``.

What the graph cannot say comes from flags, and a missing one is named in the error: ``--input-shape
C,H,W`` for dynamic channel/height/width, ``--classes FILE|N`` when the logits width is dynamic,
``--logits-output`` when the graph has several outputs and none is called ``logits``. What is
assumed rather than read (the value range, class names) is printed as a note.

The input's axis order: a model that takes ``[batch, H, W, C]`` (NHWC: what TensorFlow/Keras
exports through tf2onnx) is recognised by its last axis holding 1 or 3 channels while its second
does not (``--layout`` says it outright, and must when both could be channels). The bundle records
``input.layout: NHWC`` and ``input.shape`` as ``(C, H, W)``: the proxy's clients keep sending
``[batch, H, W, C]``, the proxy decodes it into ``[batch, C, H, W]`` for the defenses and the twin,
and an upstream model server gets NHWC again. Its ONNX file is imported with one ``Transpose`` in
front of its graph, under the same input name, so ``backbone.onnx`` and its twin take ``[batch, C,
H, W]``; the provenance keeps the original file's sha256.

Clients that normalize (``--mean M[,M...] --std S[,S...]``: the model takes ``(pixels - mean) / std``
per channel and its clients send that, as many torchvision deployments do): the bundle records
``input.normalized`` with the mean and std, the proxy turns requests back into pixels for the
defenses, and ``backbone.onnx`` is the model with ``Sub``/``Div`` in front, taking pixels
(models/client_values.py). Clients and a model that speak BGR (``--channel-order BGR``) likewise:
the proxy reverses the channels, and ``backbone.onnx`` has a ``Gather`` of them in front, taking RGB.

The logits output may hold probabilities (a model that ends in a softmax, as Keras classifiers
usually do): when every row the model returns on the check inputs lies in [0, 1] and sums to 1, the
bundle records ``backbone.output_kind: probabilities`` (``--output-kind`` says it outright; for
``--upstream``, where nothing is run, only the flag can); robustgate then runs on their logarithms
and answers probabilities again (models/output_kind.py). ``backbone.onnx`` stays the file itself.

The batch axis: the proxy coalesces requests into batches, so the graph's first input dimension
must be dynamic. A graph exported with a fixed batch of 1 (the usual omission) gets its input's and
outputs' first dimension made dynamic, and then must give each of the check items the same outputs
alone and in one batch: a reshape that baked the batch size in fails or mixes items, and the import
is then refused with the command that re-exports the model (a model that silently mixes up items is
worse than a refusal). Any other fixed batch is refused.

Every refusal is one :class:`ImportRefused` with one message, and nothing is written: the bundle is
built in a sibling temporary directory and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from robustgate.models import levels
from robustgate.models.bundle import (
    SCHEMA_VERSION, BackboneSpec, Bundle, BundleError, BundleSpec, InputSpec, UpstreamSource, artifact, provenance,
    sha256_file,
)
from robustgate.models.data import add_data_arguments
from robustgate.models.triton_repo import read_model_dir
from robustgate.models.graph_edit import (
    computes_in_fp16, float32_edges, flatten_output, free_batch, nchw_front, normalize_front, reverse_channels_front,
    uint8_front,
)

ONNX_FILE = "backbone.onnx"
PARITY_ITEMS = 64  # real (or random) images the twin is checked on
PARITY_RTOL = 1e-4  # tolerance: atol = PARITY_RTOL * max(1, max |ONNX Runtime output|), per output
# a model that computes in FP16: its kernels in ONNX Runtime and torch round differently at each layer
# (FP16's epsilon is ~1e-3)
PARITY_RTOL_FP16 = 1e-2
LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities")
PROBABILITY_ATOL = 1e-4  # a row of probabilities: entries in [-atol, 1 + atol], sum within 1e-3 of 1
CHANNEL_COUNTS = (1, 3)  # what an image's channel axis holds: grayscale, RGB
LOGITS = "logits"
FEATURES = "features"

log = logging.getLogger(__name__)


class ImportRefused(ValueError):
    """The model cannot be imported as given; the message names the problem and the flag that fixes it."""


@dataclass
class Signature:
    """What the model takes and returns. ``shape`` is (C, H, W); dims are None where dynamic."""

    input_name: str
    input_dims: list[int | None]  # [N, C, H, W] as declared
    outputs: dict[str, list[int | None]]  # name -> declared dims
    notes: list[str] = field(default_factory=list)
    uint8: bool = False  # the input takes UINT8 levels 0..255


# ---- flags ---------------------------------------------------------------------------------
def _triple(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three integers), got {text!r}") from None
    if min(c, h, w) <= 0:
        raise argparse.ArgumentTypeError(f"C,H,W must be positive, got {text!r}")
    return c, h, w


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"LO must be below HI, got {text!r}")
    return lo, hi


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _normalization(mean: tuple[float, ...] | None, std: tuple[float, ...] | None, channels: int,
                   notes: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--mean`` and ``--std`` as one value per channel (one value broadcast), or None when not given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ImportRefused("--mean and --std go together (the model takes (pixels - mean) / std)")
    out = []
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise ImportRefused(f"{flag} has {len(values)} values for {channels} channels; give one, or one per "
                                f"channel")
        out.append(tuple(float(v) for v in values) * (channels if len(values) == 1 else 1))
    if any(not v > 0 for v in out[1]):
        raise ImportRefused(f"--std {','.join(map(str, std))}: every value must be positive")
    notes.append(f"clients send (pixels - mean) / std per channel (mean {list(out[0])}, std {list(out[1])}): the "
                 f"proxy turns requests back into pixels for the defenses and sends an upstream normalized values")
    return out[0], out[1]


CHANNEL_ORDERS = ("RGB", "BGR")


def _bgr(channel_order: str | None, channels: int, notes: list[str]) -> bool:
    """``--channel-order`` -> whether the clients and the model speak BGR (refused unless 3 channels)."""
    if channel_order is None or channel_order == "RGB":
        return False
    if channel_order not in CHANNEL_ORDERS:
        raise ImportRefused(f"--channel-order {channel_order!r}: expected one of {', '.join(CHANNEL_ORDERS)}")
    if channels != 3:
        raise ImportRefused(f"--channel-order BGR needs an input with 3 channels, this one has {channels}")
    notes.append("clients send, and the model takes, BGR (--channel-order BGR): the proxy reverses the channels of "
                 "each request for the defenses, which work on RGB (JPEG's colour transform, MagNet fitted on RGB "
                 "data), and sends an upstream BGR")
    return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, metavar="MODEL.onnx", help="the model as one ONNX file")
    src.add_argument("--upstream", metavar="HOST:PORT",
                     help="read the signature from a running V2 model server (gRPC) instead; needs --model")
    src.add_argument("--triton-model", type=Path, metavar="DIR",
                     help="a model directory of a Triton model repository (DIR/config.pbtxt, "
                          "DIR/<version>/model.onnx): its ONNX file, with the layout, shape, logits output and "
                          "class names its configuration gives (models/triton_repo.py)")
    p.add_argument("--model", help="with --upstream: the model's name on that server")
    p.add_argument("--model-version", default="",
                   help="with --upstream: its version (default: the server's); with --triton-model: the version "
                        "directory (default: the highest holding the model file)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--name", help="the served model name (default: DIR's name)")
    p.add_argument("--classes", metavar="FILE|N", help="class names, one per line, or their number")
    p.add_argument("--input-shape", type=_triple, metavar="C,H,W",
                   help="per-item input shape, for dynamic C/H/W (C,H,W whatever the model's --layout)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="the model input's axis order (default: read from the graph; NHWC when its last axis is "
                        "1 or 3 and its second is not)")
    p.add_argument("--output-kind", choices=OUTPUT_KINDS, default=None,
                   help="what the logits output holds (default: read from the model's answers with --onnx: "
                        "probabilities when every row is in [0, 1] and sums to 1; logits with --upstream)")
    p.add_argument("--value-range", type=_pair, default=None, metavar="LO,HI",
                   help="the pixel range the model expects (default 0,1)")
    p.add_argument("--mean", type=_floats, default=None, metavar="M[,M...]",
                   help="with --std: the model takes (pixels - mean) / std per channel, and its clients send "
                        "that; one value, or one per channel, in the units of --value-range")
    p.add_argument("--std", type=_floats, default=None, metavar="S[,S...]", help="see --mean")
    p.add_argument("--channel-order", choices=CHANNEL_ORDERS, default=None,
                   help="the order of the 3 channels the model takes and its clients send (default RGB; BGR for "
                        "models trained on OpenCV's imread, Caffe's heritage); --mean/--std are in that order")
    p.add_argument("--logits-output", metavar="NAME", help="the output holding the logits [batch, classes]")
    p.add_argument("--features-output", metavar="NAME",
                   help="an output holding per-item features [batch, ...] (SafetyNet); default: one called 'features'")
    # the data the torch twin is checked on; recorded as the bundle's dataset (fit and eval default to it)
    add_data_arguments(p)


def command_line(args: argparse.Namespace) -> str:
    """The import as a canonical command line (every flag given, in a fixed order), for provenance:
    the same whether it came from a shell or from ``robustgate.proxy.cli.main(argv)``."""
    parts = ["robustgate", "import"]
    for key, value in vars(args).items():
        if key == "command" or value is None or value is False or (key == "model_version" and value == ""):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts += [flag, shlex.quote(text)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = command_line(args)
    try:
        if args.upstream is not None:
            if not args.model:
                raise ImportRefused("--upstream needs --model NAME (the model's name on that server)")
            for flag in ("dataset", "logits_output", "features_output"):
                if getattr(args, flag) is not None:
                    raise ImportRefused(f"--{flag.replace('_', '-')} applies to --onnx only")
            bundle = import_upstream(args.upstream, args.model, args.out, model_version=args.model_version,
                                     name=args.name, classes=args.classes, input_shape=args.input_shape,
                                     value_range=args.value_range, layout=args.layout,
                                     output_kind=args.output_kind, mean=args.mean, std=args.std,
                                     channel_order=args.channel_order, force=args.force, command=command)
        elif args.triton_model is not None:
            if args.model:
                raise ImportRefused("--model applies to --upstream only")
            bundle = import_triton(args.triton_model, args.out, args, command)
        else:
            if args.model:
                raise ImportRefused("--model applies to --upstream only")
            bundle = import_onnx(args.onnx, args.out, name=args.name, classes=args.classes,
                                 input_shape=args.input_shape, value_range=args.value_range,
                                 logits_output=args.logits_output, features_output=args.features_output,
                                 layout=args.layout, output_kind=args.output_kind, mean=args.mean, std=args.std,
                                 channel_order=args.channel_order, dataset=args.dataset, data_dir=args.data_dir,
                                 force=args.force, command=command)
    except (ImportRefused, BundleError, ValidationError) as exc:  # ValidationError: a bundle.yaml key, named
        print(f"robustgate import: {exc}", file=sys.stderr)
        return 2
    bb = bundle.spec.backbone
    twin = bb.twin_kind()
    print(f"wrote {bundle.root}: input {list(bundle.input.shape)}, {len(bundle.classes)} classes, "
          f"torch twin: {twin}")
    for note in bundle.spec.provenance.get("import_notes", []):
        print(f"note: {note}")
    return 0


# ---- the ONNX source ---------------------------------------------------------------------------
def import_onnx(
    onnx_file: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    classes: str | int | list[str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    value_range: tuple[float, float] | None = None,
    logits_output: str | None = None,
    features_output: str | None = None,
    layout: str | None = None,
    output_kind: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    channel_order: str | None = None,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    force: bool = False,
    parity_items: int = PARITY_ITEMS,
    command: str | None = None,
    source_extra: dict[str, Any] | None = None,
    extra_notes: list[str] | None = None,
) -> Bundle:
    """Imports ``onnx_file`` into the bundle directory ``out``; returns the loaded, verified bundle.
    :class:`ImportRefused` (nothing written) when the model cannot be served as given. ``layout``:
    the input's axis order, None to read it from the graph (module docstring). ``mean``, ``std``: the
    model takes ``(pixels - mean) / std`` and its clients send that; ``channel_order`` ``BGR``: they
    speak BGR (models/client_values.py)."""
    onnx_file, out = Path(onnx_file), Path(out)
    _check_out(out, force)
    if dataset is None and data_dir is not None:
        raise ImportRefused("--data-dir needs --dataset NAME")
    source_sha = sha256_file(onnx_file) if onnx_file.is_file() else None
    model, external = _load_onnx(onnx_file)
    sig = _signature(model, onnx_file)
    notes = [*(extra_notes or []), *sig.notes]
    edited = False  # backbone.onnx is the model with edits at its edges, not the file itself
    if external:
        edited = True
        notes.append(f"the weights were in external data ({', '.join(external)}); backbone.onnx holds them, one "
                     f"file; the source's sha256 are the original files'")
    uint8 = sig.uint8
    freed = sig.input_dims[0] == 1  # exported with a fixed batch of 1, the usual omission: freed below
    lo, hi = value_range or (0.0, 1.0)
    if uint8:  # innermost, at the model's own input: the fronts below work on FP32 pixels
        if mean is not None or std is not None:
            raise ImportRefused(f"{onnx_file}: input {sig.input_name!r} takes UINT8 levels, which are pixels; "
                                f"--mean/--std describe clients that send normalized FP32 values and do not apply")
        model = uint8_front(model, sig.input_name, (lo, hi))
        sig = _signature(model, onnx_file)
        edited = True
        notes.append(f"the model takes UINT8 levels 0..255: backbone.onnx takes FP32 pixels in [{lo:g}, {hi:g}] and "
                     f"maps them onto the levels in front of it (rounded half up); clients may keep sending UINT8 "
                     f"(level k is the pixel {lo:g} + k * {hi - lo:g} / 255) or send FP32 pixels; the torch twin "
                     f"passes gradients straight through the rounding (BPDA), checked on pixels that lie on the levels")
    fp16 = computes_in_fp16(model)
    if fp16:  # FP32 at the edges, as the proxy, the defenses and the twin's callers speak
        model = float32_edges(model, sig.input_name, list(sig.outputs))
        sig = _signature(model, onnx_file)
        edited = True
        notes.append("the model computes in FP16: backbone.onnx casts the FP32 pixels to FP16 in front of it and its "
                     f"FP16 outputs to FP32 after it; the torch twin is the graph in FP32 (FP16 gradients underflow), "
                     f"checked against the FP16 model to {PARITY_RTOL_FP16:g} of the largest output")
    layout = _layout(sig, layout, onnx_file)
    if layout == "NHWC":
        model = nchw_front(model, sig.input_name)
        sig = Signature(sig.input_name, [sig.input_dims[i] for i in (0, 3, 1, 2)], sig.outputs, sig.notes)
        edited = True
        notes.append("the model takes [batch, H, W, C] (NHWC), and so do the proxy's clients; backbone.onnx is it "
                     "with a Transpose in front ([batch, C, H, W], what the defenses and the twin see); the source "
                     "sha256 is the original file's")
    shape = _input_shape(sig, input_shape, onnx_file)
    normalization = _normalization(mean, std, shape[0], notes)
    if normalization is not None:
        model = normalize_front(model, sig.input_name, *normalization)
        edited = True
        notes.append("backbone.onnx is the model with the normalization in front: it takes pixels, as the defenses "
                     "and the twin do; the source sha256 is the original file's")
    bgr = _bgr(channel_order, shape[0], notes)
    if bgr:  # outermost: the normalization above is in the model's (BGR) channel order
        model = reverse_channels_front(model, sig.input_name)
        edited = True
        notes.append("backbone.onnx is the model with its channels reversed in front: it takes RGB, as the data "
                     "sets, the defenses and the twin do; the source sha256 is the original file's")
    logits_name, features_name = _pick_outputs(sig, logits_output, features_output, onnx_file)
    declared = sig.outputs[logits_name]
    if len(declared) > 2 and all(d == 1 for d in declared[2:]):  # [N, K, 1, 1]: flattened
        model = flatten_output(model, logits_name)
        sig = Signature(sig.input_name, sig.input_dims, {**sig.outputs, logits_name: declared[:2]}, sig.notes)
        edited = True
        notes.append(f"output {logits_name!r} is {_fmt(declared)}: backbone.onnx flattens it to [batch, classes] "
                     f"under the same name")
    k_declared = sig.outputs[logits_name][1] if len(sig.outputs[logits_name]) == 2 else None
    if value_range is None:
        notes.append("value range assumed 0,1 (pixels scaled to [0, 1]); --value-range LO,HI sets another")

    x, inputs_note, data_classes, transform = _parity_inputs(shape, (lo, hi), dataset, data_dir, parity_items)
    if uint8:  # what the model can be sent: the straight-through twin matches it there
        x = levels.on_levels(x, (lo, hi))
        inputs_note += ", on the UINT8 levels"
    reference = None  # the model as exported (one item at a time), when its batch axis is made dynamic
    if freed:  # last, so the fronts above keep the model's own batch of 1 in the reference
        reference = _session(model.SerializeToString() if edited else onnx_file, onnx_file)
        model = free_batch(model, sig.input_name)
        edited = True
    served = model.SerializeToString() if edited else None  # the bytes backbone.onnx holds, if not the file
    session = _session(onnx_file if served is None else served, onnx_file)
    wanted = [logits_name, *([features_name] if features_name else [])]
    ort_out = _run_checked(session, sig, wanted, x, onnx_file, reference=reference)
    if freed:
        notes.append(f"the model was exported with a fixed batch of 1: backbone.onnx has its batch axis made dynamic, "
                     f"and each of the {len(x)} check items gets the same outputs alone and in one batch")
    k = ort_out[0].shape[1]
    if k_declared is not None and k_declared != k:
        raise ImportRefused(f"{onnx_file}: output {logits_name!r} declares {k_declared} classes but returns {k}")
    class_names = _class_names(classes, k, data_classes, notes)
    output_kind = _output_kind(output_kind, ort_out[0], logits_name, notes)

    twin, twin_note, parity = _twin(model, list(sig.outputs), logits_name, features_name, x, ort_out,
                                    inputs_note, onnx_file, PARITY_RTOL_FP16 if fp16 else PARITY_RTOL)
    if twin == "none":
        notes.append(f"no torch twin: {twin_note}; only gradient-free attacks apply")

    tmp = _tmp_dir(out)
    try:
        if served is None:
            shutil.copyfile(onnx_file, tmp / ONNX_FILE)
        else:
            (tmp / ONNX_FILE).write_bytes(served)
        onnx_art = artifact(tmp, ONNX_FILE)
        if sha256_file(onnx_file) != source_sha or (served is None and onnx_art.sha256 != source_sha):
            raise ImportRefused(f"{onnx_file} changed while it was being imported; import it again")
        spec = BundleSpec(
            schema_version=SCHEMA_VERSION,
            name=name or out.name,
            input=InputSpec(name=sig.input_name, shape=shape, value_range=(lo, hi), layout=layout,
                            **_normalized_keys(normalization), **({"channel_order": "BGR"} if bgr else {})),
            classes=class_names,
            backbone=BackboneSpec(
                onnx=onnx_art, arch="onnx", twin=twin, twin_note=twin_note, twin_parity=parity or None,
                logits_output=logits_name, output_kind=output_kind, features_output=features_name,
                recipe={"imported": True, **({"precision": "fp16"} if fp16 else {}),
                        **({"input_datatype": "uint8"} if uint8 else {}),
                        **({"dataset": dataset} if dataset else {}),
                        **({"data_dir": str(data_dir)} if data_dir else {}),
                        **({"transform": transform} if transform else {})},
            ),
            provenance=provenance(source={"onnx": str(onnx_file.resolve()), "sha256": source_sha,
                                          **({"external_data": external} if external else {}),
                                          **(source_extra or {})},
                                  import_notes=notes, **({"command": command} if command else {})),
        )
        return _publish(tmp, out, spec, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_triton(model_dir: str | Path, out: str | Path, args: argparse.Namespace,
                  command: str | None = None) -> Bundle:
    """``robustgate import --triton-model DIR``: the model directory's ONNX file imported with what its
    ``config.pbtxt`` says (models/triton_repo.py) where no flag says it; a flag that contradicts the
    configuration is refused, naming both."""
    try:
        tm = read_model_dir(model_dir, args.model_version)
    except ValueError as exc:
        raise ImportRefused(str(exc)) from None
    if args.layout is not None and tm.layout is not None and args.layout != tm.layout:
        raise ImportRefused(f"--layout {args.layout} contradicts {tm.config}: its input format says {tm.layout}")
    if args.logits_output is not None and tm.logits_output is not None and args.logits_output != tm.logits_output:
        raise ImportRefused(f"--logits-output {args.logits_output} contradicts {tm.config}: its labelled output is "
                            f"{tm.logits_output!r}")
    return import_onnx(tm.onnx, out, name=args.name or tm.name, classes=args.classes or tm.classes,
                       input_shape=args.input_shape or tm.input_shape, value_range=args.value_range,
                       logits_output=args.logits_output or tm.logits_output, features_output=args.features_output,
                       layout=args.layout or tm.layout, output_kind=args.output_kind, mean=args.mean, std=args.std,
                       channel_order=args.channel_order, dataset=args.dataset, data_dir=args.data_dir,
                       force=args.force, command=command, extra_notes=tm.notes,
                       source_extra={"triton_model": str(Path(model_dir).resolve()), "triton_version": tm.version,
                                     "triton_config_sha256": tm.config_sha256})


def _normalized_keys(normalization) -> dict[str, Any]:
    if normalization is None:
        return {}
    return {"mean": normalization[0], "std": normalization[1], "normalized": True}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ImportRefused(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ImportRefused(f"{out} exists and is not a directory")


def _tmp_dir(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.import-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path, spec: BundleSpec, force: bool) -> Bundle:
    """Writes bundle.yaml into ``tmp``, verifies it loads, and renames it to ``out``."""
    Bundle(tmp, spec).save()
    Bundle.load(tmp)  # the manifest and every checksum, before anything becomes visible
    if out.exists() and force:
        shutil.rmtree(out)
    tmp.rename(out)
    return Bundle.load(out)


def _load_onnx(path: Path):
    """``path`` -> (the model with every weight in memory, ``{location: sha256}`` of the external data
    files it kept its weights in, empty for a single file). ImportRefused when it is no model, when an
    external data file is missing or lies outside the model's folder, or when the whole is too large
    for one ONNX file."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    if not path.is_file():
        raise ImportRefused(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not a model
        raise ImportRefused(f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:300]})") from None
    external = _external_files(model, path)
    if external:
        # torch.onnx.export(dynamo=True) writes the weights beside the graph by default; the bundle
        # holds one checksummed file, so they are put back into it (ONNX Runtime, the fused pass and
        # onnx2torch then all load it the same way)
        size = path.stat().st_size + sum(f.stat().st_size for f in external.values())
        if size >= ONE_FILE_LIMIT:
            raise ImportRefused(
                f"{path}: its graph and external data files hold {size / 2**30:.2f} GiB, more than one ONNX file "
                f"can (2 GiB, protobuf's limit), and a bundle holds its backbone as one file. Serve the model "
                f"from a model server (Triton, KServe, MLServer) and import it with --upstream HOST:PORT --model "
                f"NAME (no torch twin: gradient-free attacks only)")
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # a data file shorter than the graph says, and the like
            raise ImportRefused(f"{path}: its external data could not be read ({type(exc).__name__}: "
                                f"{str(exc)[:300]})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx's ValidationError and friends
        raise ImportRefused(f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:300]})") from None
    if not model.graph.node:
        raise ImportRefused(f"{path}: not a valid ONNX model (the graph has no nodes)")
    return model, {loc: sha256_file(f) for loc, f in sorted(external.items())}


ONE_FILE_LIMIT = 2**31  # bytes: protobuf's limit on one serialized message, so on one ONNX file


def _external_files(model, path: Path) -> dict[str, Path]:
    """``{location: file}`` of the external data the model's tensors (initializers and Constant
    attributes, subgraphs included) name, each checked to exist inside ``path``'s folder."""
    from onnx import TensorProto

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    base = path.parent.resolve()
    files: dict[str, Path] = {}
    for t in tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        f = (base / location).resolve()
        if not location or Path(location).is_absolute() or not f.is_relative_to(base):
            raise ImportRefused(f"{path}: tensor {t.name!r} keeps its data at {location!r}, outside the model's "
                                f"folder; external data must lie beside the model")
        if not f.is_file():
            raise ImportRefused(f"{path}: tensor {t.name!r} keeps its data in {location!r}, which is not there "
                                f"({f}); copy it beside the model")
        files[location] = f
    return files


FLOATS = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16: what a model may take and answer
UINT8 = 2  # onnx.TensorProto.UINT8: what a model may also take (pixels as levels 0..255, models/levels.py)


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _signature(model, path: Path) -> Signature:
    from onnx import TensorProto

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise ImportRefused(f"{path}: the graph takes {len(inputs)} inputs ({[v.name for v in inputs]}); "
                            f"robustgate serves image classifiers with exactly one input [batch, C, H, W]")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type not in (*FLOATS, UINT8):
        raise ImportRefused(f"{path}: input {inp.name!r} is {TensorProto.DataType.Name(inp.type.tensor_type.elem_type)}; "
                            f"robustgate feeds pixels as FP32, FP16 or UINT8 levels (export the model with one of "
                            f"those inputs)")
    dims = _dims(inp)
    if len(dims) != 4:
        raise ImportRefused(f"{path}: input {inp.name!r} has rank {len(dims)} ({dims}); expected [batch, C, H, W]")
    if dims[0] is not None and dims[0] != 1:
        raise ImportRefused(
            f"{path}: input {inp.name!r} has a fixed batch dimension of {dims[0]}; the proxy batches requests, "
            f"so the first dimension must be dynamic. Re-export the model with a dynamic batch axis, e.g. "
            f"{_BATCH_HINT}")
    outputs = {}
    for o in model.graph.output:
        if o.type.tensor_type.elem_type not in FLOATS:
            continue  # e.g. an int64 argmax output: not logits nor features
        outputs[o.name] = _dims(o)
    if not outputs:
        raise ImportRefused(f"{path}: the graph has no FP32 or FP16 output "
                            f"(outputs: {[o.name for o in model.graph.output]})")
    return Signature(inp.name, dims, outputs, uint8=inp.type.tensor_type.elem_type == UINT8)


_BATCH_HINT = ("torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},)) "
               "or, with the older exporter, dynamic_axes={'<input>': {0: 'batch'}, '<each output>': {0: 'batch'}}")


def _layout(sig: Signature, given: str | None, where: Path) -> str:
    """The input's axis order: ``given``, else read from its declared dims ``[N, a, b, c]``: NHWC when
    ``c`` holds an image's channels (1 or 3) and ``a`` does not; refused when both do (say which with
    --layout); else NCHW, any channel count (today's reading of every graph)."""
    if given is not None:
        if given not in LAYOUTS:
            raise ImportRefused(f"--layout {given!r}: expected one of {', '.join(LAYOUTS)}")
        return given
    first, last = sig.input_dims[1] in CHANNEL_COUNTS, sig.input_dims[3] in CHANNEL_COUNTS
    if first and last:
        raise ImportRefused(f"{where}: input {sig.input_name!r} has shape {_fmt(sig.input_dims)}: its second and "
                            f"last axes could both hold channels; say which with --layout NCHW or --layout NHWC")
    return "NHWC" if last else "NCHW"


def _output_kind(given: str | None, logits: np.ndarray, name: str, notes: list[str]) -> str:
    """What the logits output holds: ``given``, else ``probabilities`` when every row of ``logits``
    ``[n, K]`` (the model's answers on the check inputs) lies in [0, 1] and sums to 1, else ``logits``."""
    if given is not None:
        if given not in OUTPUT_KINDS:
            raise ImportRefused(f"--output-kind {given!r}: expected one of {', '.join(OUTPUT_KINDS)}")
        return given
    z = logits.astype(np.float64)
    in_range = (z >= -PROBABILITY_ATOL).all() and (z <= 1 + PROBABILITY_ATOL).all()
    if in_range and np.allclose(z.sum(axis=1), 1.0, atol=1e-3):
        notes.append(f"output {name!r} holds probabilities (every row of the {len(z)} check inputs is in [0, 1] "
                     f"and sums to 1): backbone.output_kind probabilities; --output-kind logits says otherwise")
        return "probabilities"
    return "logits"


def _input_shape(sig: Signature, given: tuple[int, int, int] | None, path: Path) -> tuple[int, int, int]:
    declared = sig.input_dims[1:]
    if given is None:
        missing = [axis for axis, d in zip("CHW", declared) if d is None]
        if missing:
            raise ImportRefused(
                f"{path}: input {sig.input_name!r} has dynamic {'/'.join(missing)} ({_fmt(sig.input_dims)}); "
                f"give the per-item shape the model is served at with --input-shape C,H,W")
        return tuple(declared)
    for axis, d, g in zip("CHW", declared, given):
        if d is not None and d != g:
            raise ImportRefused(f"{path}: --input-shape {','.join(map(str, given))} contradicts the graph's "
                                f"{axis} = {d} ({_fmt(sig.input_dims)})")
    return tuple(given)


def _fmt(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _pick_outputs(sig: Signature, logits: str | None, features: str | None, path: Path) -> tuple[str, str | None]:
    names = list(sig.outputs)
    for flag, value in (("--logits-output", logits), ("--features-output", features)):
        if value is not None and value not in names:
            raise ImportRefused(f"{path}: {flag} {value!r} is not an FP32 output of the graph (outputs: {names})")
    if logits is None:
        if LOGITS in names:
            logits = LOGITS
        elif len(names) == 1:
            logits = names[0]
        else:
            raise ImportRefused(f"{path}: the graph has several outputs {names} and none is called 'logits'; "
                                f"name the one holding [batch, classes] with --logits-output NAME")
    if features is None and FEATURES in names and logits != FEATURES:
        features = FEATURES
    if features == logits:
        raise ImportRefused(f"{path}: --features-output and the logits output are both {logits!r}")
    dims = sig.outputs[logits]
    flat = len(dims) == 2 or (len(dims) > 2 and all(d == 1 for d in dims[2:]))  # [N, K, 1, 1] is flattened
    if not flat or (dims[0] is not None and dims[0] != sig.input_dims[0]):
        raise ImportRefused(f"{path}: output {logits!r} has shape {_fmt(dims)}; the logits must be [batch, classes] "
                            f"(name another output with --logits-output NAME)")
    if features is not None and len(sig.outputs[features]) < 2:
        raise ImportRefused(f"{path}: features output {features!r} has shape {_fmt(sig.outputs[features])}; "
                            f"expected [batch, ...]")
    return logits, features


def _session(source: Path | bytes, path: Path):
    """An ONNX Runtime session of ``source`` (the file, or a graph's bytes); ``path`` names it in errors."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ImportRefused(f"{path}: ONNX Runtime cannot load the model: {exc}") from None


def _run_checked(session, sig: Signature, outputs: list[str], x: np.ndarray, path: Path,
                 reference=None) -> list[np.ndarray]:
    """Runs ``x`` [n, C, H, W] and one item alone; every output must keep the batch as its first
    dimension, and the logits be [n, K]: the declared signature is checked by running it.
    ``reference``: the session of the model as exported with a fixed batch of 1, whose batch axis the
    import made dynamic for ``session``: then every item, alone and in the batch, must get what the
    reference gives it (a reshape that baked the batch in would mix items, or fail)."""
    every_item = reference is not None
    refit = (f" (the model was exported with a fixed batch of 1, and making it dynamic does not work: re-export "
             f"it with a dynamic batch axis, e.g. {_BATCH_HINT})") if every_item else ""
    try:
        got = session.run(outputs, {sig.input_name: x})
        one = session.run(outputs, {sig.input_name: x[:1]})
    except Exception as exc:  # ORT's errors are not a stable hierarchy
        raise ImportRefused(f"{path}: ONNX Runtime fails on a batch of shape {list(x.shape)} (a model that takes "
                            f"[batch, H, W, C] needs --layout NHWC): {exc}{refit}") from None
    for name, a, b in zip(outputs, got, one):
        if a.ndim < 2 or a.shape[0] != len(x) or b.shape[0] != 1:
            raise ImportRefused(f"{path}: output {name!r} returns shape {list(a.shape)} for a batch of {len(x)} "
                                f"(and {list(b.shape)} for 1); expected [batch, ...]{refit}")
    logits = got[0]
    if logits.ndim != 2:
        raise ImportRefused(f"{path}: output {outputs[0]!r} returns shape {list(logits.shape)}; the logits must be "
                            f"[batch, classes] (name another output with --logits-output NAME)")
    if logits.shape[1] < 2:
        raise ImportRefused(f"{path}: output {outputs[0]!r} has {logits.shape[1]} class(es); a classifier needs >= 2")
    for i in range(len(x) if every_item else 1):
        alone = one if i == 0 else session.run(outputs, {sig.input_name: x[i:i + 1]})
        exported = reference.run(outputs, {sig.input_name: x[i:i + 1]}) if every_item else None
        for j, name in enumerate(outputs):
            b = alone[j]
            tol = 1e-4 * max(1.0, float(np.abs(b).max()))
            if not np.allclose(got[j][i:i + 1], b, rtol=1e-4, atol=tol):
                raise ImportRefused(f"{path}: item {i} gets a different {name!r} alone and in a batch of {len(x)}: "
                                    f"the graph mixes items across the batch (was the batch size baked in at "
                                    f"export?){refit}")
            if exported is not None and not np.allclose(exported[j], b, rtol=1e-4, atol=tol):
                raise ImportRefused(f"{path}: item {i} gets a different {name!r} once the batch axis is dynamic "
                                    f"than from the model as exported{refit}")
    return [np.asarray(a, dtype=np.float32) for a in got]


def _class_names(classes: str | int | list[str] | None, k: int, data_classes: list[str] | None,
                 notes: list[str]) -> list[str]:
    if classes is None:
        if data_classes is not None and len(data_classes) == k:
            notes.append("class names taken from the dataset")
            return list(data_classes)
        notes.append(f"class names not given: called 0..{k - 1}; --classes FILE names them")
        return [str(i) for i in range(k)]
    if isinstance(classes, list):  # given by a caller (the configuration's label file of --triton-model)
        names = classes
        if len(names) != k:
            raise ImportRefused(f"{len(names)} class names ({names[0]!r}, ...) for a logits output of {k} classes")
    elif isinstance(classes, int) or str(classes).isdigit():
        n = int(classes)
        if n != k:
            raise ImportRefused(f"--classes {n}: the logits output has {k} classes")
        return [str(i) for i in range(k)]
    else:
        path = Path(classes)
        if not path.is_file():
            raise ImportRefused(f"--classes {classes}: neither a number nor a file")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) != k:
            raise ImportRefused(f"--classes {path}: {len(names)} class names for a logits output of {k} classes")
    if len(set(names)) != len(names):
        raise ImportRefused(f"--classes: class names repeat ({names})")
    if data_classes is not None and set(names) == set(data_classes) and list(names) != list(data_classes):
        # the data layer numbers the dataset's classes in its own order: every accuracy would be wrong
        raise ImportRefused(f"--classes names the dataset's classes in another order ({names}); the dataset numbers "
                            f"them {list(data_classes)}: give the class names in the order of the model's logits")
    return list(names)


def _parity_inputs(shape: tuple[int, int, int], value_range: tuple[float, float], dataset: str | None,
                   data_dir: str | Path | None, n: int) -> tuple[np.ndarray, str, list[str] | None, dict | None]:
    """``[n, C, H, W]`` float32 in the value range, a sentence saying what they are, the dataset's
    class names and the transform that conformed its images to ``shape`` (both None without a
    dataset)."""
    lo, hi = value_range
    if dataset is None:
        rng = np.random.default_rng(0)
        x = (lo + (hi - lo) * rng.random((n, *shape))).astype(np.float32)
        return x, f"{n} uniform random images in [{lo}, {hi}] (seed 0; no --dataset given)", None, None
    import torch

    from robustgate.models.data import DatasetMissing, load_splits

    try:
        # the one data layer every command uses (conforms only the n test images taken)
        splits = load_splits(dataset, data_dir, val_size=None, input_shape=shape)
        images, _ = splits.take("test", min(n, splits.size("test")))  # [n, C, H, W] in [0, 1]
        transform = splits.info["transform"]
    except (DatasetMissing, ValueError, OSError) as exc:
        raise ImportRefused(f"--dataset {dataset}: {exc}") from None
    x = (lo + (hi - lo) * images).to(torch.float32).contiguous().numpy()
    what = f"the first {len(x)} images of {dataset}'s test split, conformed to {list(shape)}, scaled to [{lo}, {hi}]"
    return x, what, list(splits.classes), transform


def _twin(model, output_names: list[str], logits: str, features: str | None, x: np.ndarray,
          ort_out: list[np.ndarray], inputs_note: str, path: Path,
          rtol: float = PARITY_RTOL) -> tuple[str, str | None, dict[str, Any]]:
    """Converts and checks the torch twin: ("onnx", note, parity) or ("none", why, parity)."""
    import torch

    from robustgate.models.twin import OnnxTwin, Unconvertible, convert_onnx, onnx2torch_version, twin_graph

    try:
        import onnx2torch  # noqa: F401 - declared in pyproject; a missing one means no twin, said so
    except ImportError:
        return "none", "onnx2torch is not installed", {}
    version = onnx2torch_version()
    try:
        twin = OnnxTwin(convert_onnx(twin_graph(model)), output_names, logits, features).eval()
    except Unconvertible as exc:
        return "none", f"onnx2torch {version} cannot convert {path.name}: {exc}", {}
    names = [logits, *([features] if features else [])]
    diffs, tols = {}, {}
    try:
        with torch.no_grad():
            xt = torch.from_numpy(x)
            got = [twin(xt)] + ([twin.features(xt)] if features else [])
    except Exception as exc:  # a converted module that fails to run is no twin; say why
        return "none", f"the onnx2torch {version} conversion fails to run: {type(exc).__name__}: {exc}", {}
    for name, want, have in zip(names, ort_out, got):
        want = want.reshape(len(x), -1)
        have = have.detach().numpy().reshape(len(x), -1)
        if want.shape != have.shape:
            return "none", f"the converted module returns {name} of shape {list(have.shape)}, ONNX Runtime {list(want.shape)}", {}
        diffs[name] = float(np.abs(want - have).max())
        tols[name] = rtol * max(1.0, float(np.abs(want).max()))
    agree = float((ort_out[0].argmax(1) == got[0].detach().numpy().argmax(1)).mean())
    parity = {"inputs": inputs_note, "items": len(x), "max_abs_diff": diffs, "atol": tols,
              "argmax_agreement": agree, "converter": f"onnx2torch {version}"}
    bad = {k: v for k, v in diffs.items() if not v <= tols[k]}
    if bad:
        return "none", f"the onnx2torch {version} conversion differs from ONNX Runtime by {bad} (> atol {tols})", parity
    return "onnx", f"converted from {ONNX_FILE} by onnx2torch {version} when loaded", parity


# ---- the upstream source -----------------------------------------------------------------------
_V2_TYPES_OK = ("FP32", "FP16", "UINT8")  # what the upstream backend sends (proxy/backends/upstream.py)


def import_upstream(
    url: str,
    model_name: str,
    out: str | Path,
    *,
    model_version: str = "",
    name: str | None = None,
    classes: str | int | list[str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    value_range: tuple[float, float] | None = None,
    layout: str | None = None,
    output_kind: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    channel_order: str | None = None,
    force: bool = False,
    timeout_s: float = 10.0,
    command: str | None = None,
) -> Bundle:
    """Reads ``model_name``'s ModelMetadata from the V2 gRPC server at ``url`` and writes a bundle
    with no ONNX file and no twin (served with ``backend.kind: upstream``); ``layout`` as
    :func:`import_onnx`'s; ``output_kind`` as given, else ``logits`` (nothing is run to check)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    from robustgate.proxy.backends.upstream import split_url

    out = Path(out)
    _check_out(out, force)
    try:
        split_url(url)
    except ValueError as exc:
        raise ImportRefused(f"--upstream: {exc}") from None
    try:
        with tc.InferenceServerClient(url) as client:
            meta = client.get_model_metadata(model_name, model_version, as_json=True, client_timeout=timeout_s)
    except InferenceServerException as exc:
        raise ImportRefused(f"--upstream {url} --model {model_name}: ModelMetadata failed: {exc}") from None
    where = f"{url} model {model_name!r}"
    inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
    if len(inputs) != 1:
        raise ImportRefused(f"{where}: declares {len(inputs)} inputs; robustgate serves classifiers with one input")
    inp = inputs[0]
    if inp.get("datatype") not in _V2_TYPES_OK:
        raise ImportRefused(f"{where}: input {inp['name']!r} is {inp.get('datatype')}; the upstream backend sends "
                            f"FP32, FP16 or UINT8")
    dims = [int(d) for d in inp.get("shape", [])]
    dims = [None if d < 0 else d for d in dims]
    notes = []
    omitted = len(dims) == 3  # Triton with max_batch_size > 0 leaves the batch axis out of the metadata
    if omitted:
        dims = [None, *dims]
    if len(dims) != 4:
        raise ImportRefused(f"{where}: input {inp['name']!r} has shape {_fmt(dims)}; expected [batch, C, H, W]")
    if dims[0] is not None:
        raise ImportRefused(f"{where}: input {inp['name']!r} has a fixed batch dimension of {dims[0]}; the proxy "
                            f"batches requests, so the model must accept a dynamic batch")
    sig = Signature(inp["name"], dims, {o["name"]: [None if int(d) < 0 else int(d) for d in o.get("shape", [])]
                                        for o in outputs})
    layout = _layout(sig, layout, Path(where))
    if layout == "NHWC":
        sig = Signature(sig.input_name, [dims[i] for i in (0, 3, 1, 2)], sig.outputs)
        notes.append("the model takes [batch, H, W, C] (NHWC), and so do the proxy's clients; the defenses see "
                     "[batch, C, H, W]")
    shape = _input_shape(sig, input_shape, Path(where))
    if inp["datatype"] == "UINT8":
        if mean is not None or std is not None:
            raise ImportRefused(f"{where}: input {inp['name']!r} takes UINT8 levels, which are pixels; --mean/--std "
                                f"describe clients that send normalized FP32 values and do not apply")
        notes.append("the model takes UINT8 levels 0..255: the proxy sends it each batch as levels spanning the value "
                     "range (rounded half up); clients may keep sending UINT8, or send FP32 pixels")
    normalization = _normalization(mean, std, shape[0], notes)
    bgr = _bgr(channel_order, shape[0], notes)
    names = list(sig.outputs)
    logits = LOGITS if LOGITS in names else (names[0] if len(names) == 1 else None)
    if logits is None:
        # the upstream backend reads "logits" or the only output (proxy/backends/upstream.py)
        raise ImportRefused(f"{where}: outputs {names}; the upstream backend needs one called 'logits' or a single output")
    ldims = sig.outputs[logits]
    if omitted or len(ldims) == 1:
        ldims = [None, *ldims]
    while len(ldims) > 2 and ldims[-1] == 1:  # [N, K, 1, 1]: the upstream backend reads it as [N, K]
        ldims = ldims[:-1]
    if len(ldims) != 2 or ldims[0] is not None:
        raise ImportRefused(f"{where}: output {logits!r} has shape {_fmt(ldims)}; the logits must be [batch, classes]")
    k = ldims[1]
    if k is None:
        if classes is None:
            raise ImportRefused(f"{where}: output {logits!r} has a dynamic class count; give --classes FILE|N")
        k = int(classes) if isinstance(classes, int) or str(classes).isdigit() else None
        if k is None:
            k = len([l for l in Path(classes).read_text().splitlines() if l.strip()]) if Path(classes).is_file() else 0
    lo, hi = value_range or (0.0, 1.0)
    if value_range is None:
        notes.append("value range assumed 0,1 (pixels scaled to [0, 1]); --value-range LO,HI sets another")
    class_names = _class_names(classes, k, None, notes)
    notes.append("no ONNX file: serve with backend.kind: upstream; no torch twin (only gradient-free attacks apply)")
    if output_kind is None:
        notes.append(f"output {logits!r} taken for logits (not checked without the ONNX file); --output-kind "
                     f"probabilities if the model ends in a softmax")
    elif output_kind not in OUTPUT_KINDS:
        raise ImportRefused(f"--output-kind {output_kind!r}: expected one of {', '.join(OUTPUT_KINDS)}")
    tmp = _tmp_dir(out)
    try:
        spec = BundleSpec(
            schema_version=SCHEMA_VERSION,
            name=name or model_name,
            input=InputSpec(name=inp["name"], shape=shape, value_range=(lo, hi), layout=layout,
                            **_normalized_keys(normalization), **({"channel_order": "BGR"} if bgr else {})),
            classes=class_names,
            backbone=BackboneSpec(
                upstream=UpstreamSource(url=url, model_name=model_name, model_version=model_version,
                                        platform=str(meta.get("platform", ""))),
                arch="upstream", twin="none", output_kind=output_kind or "logits",
                twin_note=f"imported from a model server ({where}) without its ONNX file",
                logits_output=logits, recipe={"imported": True},
            ),
            provenance=provenance(source={"upstream": url, "model_name": model_name, "model_version": model_version,
                                          "metadata_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()},
                                  import_notes=notes, **({"command": command} if command else {})),
        )
        return _publish(tmp, out, spec, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
