"""Open Inference Protocol v2 <-> numpy: decode and validate a ModelInferRequest, encode the answer.

Pure functions, no I/O: the server calls :func:`decode_infer` on the way in and
:func:`encode_infer` on the way out. Every rejection of a malformed request raises
:class:`ProtocolError` with the gRPC status name and a message saying exactly what was wrong
(docs/PROTOCOL.md lists them).

- Inputs: one tensor named as the bundle's input, shape ``[N, C, H, W]`` with ``(C, H, W)`` the
  bundle's per-item shape (``[N, H, W, C]`` when the bundle's ``input.layout`` is NHWC, a
  channels-last model: decoded into ``[N, C, H, W]`` for the pipeline), datatype FP32 (pixels in
  the declared value range) or UINT8 (levels 0..255 spanning the value range, models/levels.py: in
  [0, 1] divided by 255, bit-identical to the dataset loaders' floats); contents typed
  (``fp32_contents`` / ``uint_contents``) or raw
  (``raw_input_contents``, little-endian), never both.
- Outputs: the bundle's logits output ``[N, K]`` FP32, ``robustgate_verdict`` INT32 ``[N]``,
  ``robustgate_score_<stage>`` FP32 ``[N]`` per detector stage (only with ``server.explain``), ``robustgate_radius`` FP32 ``[N]``
  when an ensemble stage certifies; parameters ``robustgate_verdicts`` and ``robustgate_reasons``.
  Raw when the request was raw (tritonclient reads only ``raw_output_contents``), typed otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from robustgate.models import levels
from robustgate.models.client_values import ROUNDING, ClientValues
from robustgate.protos import open_inference_grpc_pb2 as pb

VERDICT_OUTPUT = "robustgate_verdict"
RADIUS_OUTPUT = "robustgate_radius"
SCORE_PREFIX = "robustgate_score_"
VERDICTS_PARAM = "robustgate_verdicts"
REASONS_PARAM = "robustgate_reasons"
VERDICT_NAMES = ("accepted", "flagged", "rejected")

_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
_TYPED_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
_INF = float("inf")
MAX_RESPONSE_HEADS = 1024
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce  # the ufuncs themselves: numpy's min()/max() wrappers cost more than a 784-value reduction
_CONTENT_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp32_contents", "fp64_contents", "bytes_contents",
)


class ProtocolError(Exception):
    """A request the proxy refuses; ``code`` is a ``grpc.StatusCode`` name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InputContract:
    """What the served model accepts and offers, from the bundle and the configured stages."""

    model_name: str
    versions: tuple[str, ...]
    input_name: str
    item_shape: tuple[int, int, int]  # (C, H, W)
    value_range: tuple[float, float]
    max_batch_items: int
    logits_output: str
    detector_stages: tuple[str, ...] = ()
    has_ensemble: bool = False
    channels_last: bool = False  # requests are [N, H, W, C] (the bundle's input.layout NHWC)
    # requests hold (pixels - mean) / std (FP32; the bundle's input.normalized) or BGR channels (the
    # bundle's input.channel_order): turned back into RGB pixels
    client_values: ClientValues | None = None

    @functools.cached_property
    def wire_shape(self) -> tuple[int, int, int]:
        """An item's shape in a request: ``(C, H, W)``, or ``(H, W, C)`` channels last."""
        c, h, w = self.item_shape
        return (h, w, c) if self.channels_last else (c, h, w)

    @functools.cached_property  # asked per request; the contract never changes (a frozen dataclass)
    def output_names(self) -> tuple[str, ...]:
        names = [self.logits_output, VERDICT_OUTPUT, *(SCORE_PREFIX + s for s in self.detector_stages)]
        if self.has_ensemble:
            names.append(RADIUS_OUTPUT)
        return tuple(names)

    @functools.cached_property
    def response_heads(self) -> dict[tuple, bytes]:
        """:func:`encode_infer_bytes`' cache: the serialized fixed part of a raw answer by (version,
        outputs, N, K); at most MAX_RESPONSE_HEADS entries (a client choosing odd output lists and
        batch sizes cannot grow it without bound)."""
        return {}


@dataclass
class Decoded:
    x: np.ndarray  # [N, C, H, W] float32 (whatever the wire layout), C-contiguous, finite, in the value range
    raw: bool  # the request used raw_input_contents -> answer raw
    outputs: tuple[str, ...]  # requested outputs in answer order (all when none requested)
    request_id: str = ""
    datatype: str = "FP32"


@dataclass
class Answer:
    """One request's share of a pipeline result, as numpy."""

    logits: np.ndarray  # [N, K] float32 (NaN rows for rejected items in item mode)
    verdict: np.ndarray  # [N] int
    reasons: list[str | None]
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # stage -> [N]
    radius: np.ndarray | None = None  # [N]
    verdict_names: list[str] | None = None  # VERDICT_NAMES of ``verdict`` when already known


def check_model(name: str, version: str, contract: InputContract) -> None:
    """NOT_FOUND unless ``name`` is the served model and ``version`` empty or one it has."""
    if name != contract.model_name:
        raise ProtocolError("NOT_FOUND", f"unknown model {name!r}; this server serves {contract.model_name!r}")
    if version and version not in contract.versions:
        raise ProtocolError(
            "NOT_FOUND",
            f"model {name!r} has no version {version!r}; versions: {', '.join(contract.versions) or 'none'}",
        )


def _invalid(msg: str) -> ProtocolError:
    return ProtocolError("INVALID_ARGUMENT", msg)


def decode_infer(req: pb.ModelInferRequest, contract: InputContract) -> Decoded:
    """Validates ``req`` against ``contract`` and returns the pixel batch. Raises ProtocolError."""
    check_model(req.model_name, req.model_version, contract)

    # 1. exactly one input, the bundle's
    if len(req.inputs) != 1:
        raise _invalid(f"expected exactly 1 input ({contract.input_name!r}), got {len(req.inputs)}")
    inp = req.inputs[0]
    if inp.name != contract.input_name:
        raise _invalid(f"unknown input {inp.name!r}; the model's input is {contract.input_name!r}")
    if inp.datatype not in _DTYPES:
        raise _invalid(f"input {inp.name!r}: datatype {inp.datatype!r} is not supported; send FP32 or UINT8")

    # 2. shape [N, C, H, W] ([N, H, W, C] channels last)
    shape = tuple(inp.shape)  # ints already (repeated int64)
    c, h, w = contract.item_shape
    if len(shape) != 4 or shape[1:] != contract.wire_shape:
        want = f"[N, {h}, {w}, {c}] (channels last)" if contract.channels_last else f"[N, {c}, {h}, {w}]"
        raise _invalid(f"input {inp.name!r}: shape {list(shape)} does not match {want}")
    n = shape[0]
    if n < 1:
        raise _invalid(f"input {inp.name!r}: batch size must be at least 1, got {n}")
    if n > contract.max_batch_items:
        raise _invalid(
            f"input {inp.name!r}: batch of {n} items exceeds the limit of {contract.max_batch_items} "
            f"(limits.max_batch_items); split the request"
        )
    count = n * c * h * w
    dtype = _DTYPES[inp.datatype]

    # 3. contents: raw or typed, never both. ``contents`` is a message field: unset (the raw
    # requests' common case) means no typed field is set, without asking the eight of them
    typed_set = [f for f in _CONTENT_FIELDS if len(getattr(inp.contents, f))] if inp.HasField("contents") else []
    raw_contents = req.raw_input_contents
    raw = len(raw_contents) > 0
    if raw and typed_set:
        raise _invalid(f"input {inp.name!r}: both raw_input_contents and typed contents ({typed_set[0]}) given; send one")
    if raw:
        if len(raw_contents) != 1:
            raise _invalid(f"raw_input_contents has {len(raw_contents)} entries for 1 input")
        buf = raw_contents[0]
        want = count * dtype.itemsize
        if len(buf) != want:
            raise _invalid(
                f"input {inp.name!r}: raw_input_contents holds {len(buf)} bytes; shape {list(shape)} "
                f"{inp.datatype} needs {want}"
            )
        arr = np.frombuffer(buf, dtype=dtype)
    else:
        expected = _TYPED_FIELD[inp.datatype]
        wrong = [f for f in typed_set if f != expected]
        if wrong:
            raise _invalid(f"input {inp.name!r}: {inp.datatype} data goes in contents.{expected}, got contents.{wrong[0]}")
        values = getattr(inp.contents, expected)
        if len(values) != count:
            raise _invalid(
                f"input {inp.name!r}: contents.{expected} holds {len(values)} values; shape {list(shape)} needs {count}"
            )
        if inp.datatype == "UINT8":
            arr = np.asarray(values, dtype=np.uint32)
            if arr.size and arr.max() > 255:
                raise _invalid(f"input {inp.name!r}: UINT8 value {int(arr.max())} in contents.uint_contents exceeds 255")
            arr = arr.astype(np.uint8)
        else:
            arr = np.asarray(values, dtype=np.float32)

    # 4. to float32 pixels (a fresh, writable, C-contiguous copy: the request's bytes are read-only),
    # then finiteness and range in two reductions: a NaN makes min/max NaN and fails the comparison,
    # an infinity falls outside any finite range; only a failing request pays for the exact message
    cv = contract.client_values
    axis = 3 if contract.channels_last else 1  # the wire layout's channel axis
    if inp.datatype == "UINT8":  # pixels by nature (not de-normalized), in the clients' channel order
        rgb = arr if cv is None else cv.rgb(arr.reshape(shape), axis)  # a view; the one copy is below
        x = levels.pixels(rgb, contract.value_range).reshape(-1)  # 0, 255: the range's ends; [0, 1]: k / 255
    elif cv is not None:  # back to RGB pixels along the wire layout's channel axis, the copy included
        x = cv.pixels(arr.reshape(shape), axis, out=np.empty(shape, dtype=np.float32)).reshape(-1)
    else:
        x = arr.astype(np.float32, copy=True)
    norm = cv if cv is not None and cv.normalizes and inp.datatype != "UINT8" else None
    lo, hi = contract.value_range
    xmin, xmax = float(_MIN(x)), float(_MAX(x))
    if not (lo <= xmin and xmax <= hi and xmax - xmin < _INF):  # the difference: an infinity in an unbounded range
        slack = ROUNDING * (hi - lo)
        if norm is not None and lo - slack <= xmin and xmax <= hi + slack:  # float rounding of a boundary pixel
            np.clip(x, lo, hi, out=x)
        else:
            _range_error(inp.name, x.reshape(n, -1), lo, hi, norm is not None)
    x = x.reshape(shape)  # [N, C, H, W]
    if contract.channels_last:  # [N, H, W, C] on the wire: the pipeline's order, contiguous (one more copy)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    # 5. requested outputs
    if req.outputs:
        available = contract.output_names
        names = []
        for o in req.outputs:
            if o.name not in available:
                raise _invalid(f"unknown requested output {o.name!r}; available: {', '.join(available)}")
            if o.name not in names:
                names.append(o.name)
        outputs = tuple(names)
    else:
        outputs = contract.output_names
    return Decoded(x=x, raw=raw, outputs=outputs, request_id=req.id, datatype=inp.datatype)


def _range_error(name: str, x: np.ndarray, lo: float, hi: float, normalized: bool = False) -> None:
    """Raises the exact INVALID_ARGUMENT for pixels ``x`` ``[N, D]`` that are not all finite and in
    ``[lo, hi]``: the first item with NaN or Inf, else the range the values span. ``normalized``: the
    request held normalized values, ``x`` is what they are as pixels."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.flatnonzero((~finite).any(axis=1))[0])
        raise _invalid(f"input {name!r}: item {bad} contains NaN or Inf")
    xmin, xmax = float(x.min()), float(x.max())
    if normalized:
        raise _invalid(
            f"input {name!r}: the normalized values are pixels in [{xmin:.6g}, {xmax:.6g}], outside the declared "
            f"range [{lo:g}, {hi:g}] (send (pixels - mean) / std with the model's mean and std)"
        )
    raise _invalid(
        f"input {name!r}: values in [{xmin:.6g}, {xmax:.6g}] fall outside the declared range "
        f"[{lo:g}, {hi:g}] (send raw pixels, not normalized ones)"
    )


def encode_infer(
    decoded: Decoded, answer: Answer, contract: InputContract, model_version: str = ""
) -> pb.ModelInferResponse:
    """The response for one request: requested outputs in ``decoded.outputs`` order, raw or typed."""
    n = answer.verdict.shape[0]
    tensors: dict[str, tuple[str, np.ndarray]] = {
        contract.logits_output: ("FP32", np.asarray(answer.logits, dtype="<f4")),
        VERDICT_OUTPUT: ("INT32", np.asarray(answer.verdict, dtype="<i4")),
    }
    for stage in contract.detector_stages:
        s = answer.scores.get(stage)
        tensors[SCORE_PREFIX + stage] = ("FP32", np.full(n, np.nan, "<f4") if s is None else np.asarray(s, dtype="<f4"))
    if contract.has_ensemble:
        r = answer.radius
        tensors[RADIUS_OUTPUT] = ("FP32", np.full(n, np.nan, "<f4") if r is None else np.asarray(r, dtype="<f4"))

    resp = pb.ModelInferResponse(model_name=contract.model_name, model_version=model_version, id=decoded.request_id)
    for name in decoded.outputs:
        datatype, arr = tensors[name]
        out = resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        if decoded.raw:
            resp.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
        elif datatype == "FP32":
            out.contents.fp32_contents.extend(arr.reshape(-1).tolist())
        else:
            out.contents.int_contents.extend(arr.reshape(-1).tolist())
    _set_verdict_params(resp, answer)
    return resp


def _set_verdict_params(resp: pb.ModelInferResponse, answer: Answer) -> None:
    names = answer.verdict_names
    if names is None:
        names = [VERDICT_NAMES[v] for v in np.asarray(answer.verdict).tolist()]
    resp.parameters[VERDICTS_PARAM].string_param = ",".join(names)
    resp.parameters[REASONS_PARAM].string_param = ",".join([r or "" for r in answer.reasons])


def encode_infer_bytes(decoded: Decoded, answer: Answer, contract: InputContract, model_version: str = "") -> bytes:
    """:func:`encode_infer`'s response, serialized: the bytes the server sends. A raw answer is its
    fixed part (model name and version, each output's name, datatype and shape), serialized once
    per (version, outputs, N, K) and cached on ``contract``, followed by a small message with what
    changes per request (id, parameters, raw contents): protobuf parses the concatenation of two
    serialized messages as their merge (repeated fields appended, maps merged), so a client reads
    exactly :func:`encode_infer`'s message, without the server building the outputs' message objects
    for every answer. A typed answer is :func:`encode_infer`'s, serialized."""
    if not decoded.raw:
        return encode_infer(decoded, answer, contract, model_version).SerializeToString()
    n, k = answer.logits.shape
    key = (model_version, decoded.outputs, n, k)
    head = contract.response_heads.get(key)
    if head is None:
        fixed = pb.ModelInferResponse(model_name=contract.model_name, model_version=model_version)
        for name in decoded.outputs:
            datatype, shape = ("FP32", [n, k]) if name == contract.logits_output else (
                ("INT32", [n]) if name == VERDICT_OUTPUT else ("FP32", [n]))
            fixed.outputs.add(name=name, datatype=datatype, shape=shape)
        head = fixed.SerializeToString()
        if len(contract.response_heads) < MAX_RESPONSE_HEADS:
            contract.response_heads[key] = head
    contents = []
    for name in decoded.outputs:
        if name == contract.logits_output:
            contents.append(np.ascontiguousarray(answer.logits, dtype="<f4").tobytes())
        elif name == VERDICT_OUTPUT:
            contents.append(np.asarray(answer.verdict, dtype="<i4").tobytes())
        else:
            v = answer.radius if name == RADIUS_OUTPUT else answer.scores.get(name[len(SCORE_PREFIX):])
            contents.append(np.full(n, np.nan, "<f4").tobytes() if v is None else np.asarray(v, dtype="<f4").tobytes())
    tail = pb.ModelInferResponse(id=decoded.request_id, raw_output_contents=contents)
    _set_verdict_params(tail, answer)
    return head + tail.SerializeToString()
