"""Property-based tests (hypothesis) of the request decoding and validation path (proxy/codec.py).

Any ModelInferRequest -- random model names and versions (unicode), 0-2 input tensors with random
names, datatypes, shapes (huge, zero, negative dimensions, any rank), raw buffers of any length,
typed contents in any field, requested outputs and parameters -- either decodes into a valid batch
(float32 [N, C, H, W], 1 <= N <= the limit, finite, inside the value range, exactly the values
sent) or raises the codec's ProtocolError with INVALID_ARGUMENT / NOT_FOUND and a message; never
any other exception. A well-formed request always decodes to exactly its pixels, and each known
defect applied to it is refused with the documented status.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from robustgate.models.client_values import ClientValues
from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.proxy.codec import InputContract, ProtocolError, decode_infer

CONTRACT = InputContract(
    model_name="tiny", versions=("1",), input_name="input", item_shape=(1, 4, 4), value_range=(0.0, 1.0),
    max_batch_items=4, logits_output="logits", detector_stages=("magnet",), has_ensemble=False,
)
ITEM = 16  # 1 * 4 * 4
DATATYPES = ["FP32", "UINT8", "FP64", "FP16", "INT32", "INT64", "UINT32", "BOOL", "BYTES", "", "fp32"]
FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
          "fp32_contents", "fp64_contents", "bytes_contents"]
PROFILE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# protobuf strings are UTF-8: every code point but lone surrogates
unicode = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
names = st.one_of(st.sampled_from(["tiny", "input", "logits", "robustgate_verdict", "", "1"]), unicode)
dims = st.one_of(st.integers(-3, 6), st.integers(-(2**63), 2**63 - 1), st.sampled_from([28, 2**31, 2**32 + 16]))
shapes = st.one_of(
    st.builds(lambda n: [n, 1, 4, 4], dims),  # the right item shape, any batch size
    st.lists(dims, max_size=6),
)


def _fill_values(field: str, count: int, seed: int, mode: str):
    rng = np.random.default_rng(seed)
    if field in ("fp32_contents", "fp64_contents"):
        v = rng.random(count)
        if count and mode == "bad":
            v[rng.integers(count)] = rng.choice([np.nan, np.inf, -np.inf, -0.5, 1.5, 3.4e38, -1e-30])
        return v.tolist()
    if field == "bool_contents":
        return rng.integers(0, 2, count).astype(bool).tolist()
    if field == "bytes_contents":
        return [bytes(rng.integers(0, 256, 3, dtype=np.uint8)) for _ in range(count)]
    hi = {"int_contents": 2**31 - 1, "int64_contents": 2**63 - 1, "uint_contents": 2**32 - 1,
          "uint64_contents": 2**63}[field]
    top = 300 if mode == "bad" else 256
    v = rng.integers(0, min(top, hi), count)
    return v.tolist()


@st.composite
def tensors(draw, data_len_hint: int):
    t = pb.ModelInferRequest.InferInputTensor(
        name=draw(names), datatype=draw(st.sampled_from(DATATYPES) | unicode), shape=draw(shapes),
    )
    for key in draw(st.lists(unicode, max_size=2)):
        t.parameters[key].string_param = draw(unicode)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        count = draw(st.sampled_from([data_len_hint, data_len_hint - 1, data_len_hint + 1, 0, 3]))
        getattr(t.contents, field).extend(_fill_values(field, max(count, 0), draw(st.integers(0, 2**32)),
                                                       draw(st.sampled_from(["good", "bad"]))))
    return t


@st.composite
def requests(draw):
    n = draw(st.integers(0, 5))
    req = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["tiny"]) | names), model_version=draw(st.sampled_from(["", "1"]) | unicode),
        id=draw(unicode),
    )
    for key in draw(st.lists(unicode, max_size=3)):
        choice = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64"]))
        value = {"bool": st.booleans(), "int64": st.integers(-(2**63), 2**63 - 1), "string": unicode,
                 "double": st.floats(), "uint64": st.integers(0, 2**64 - 1)}[choice]
        setattr(req.parameters[key], f"{choice}_param", draw(value))
    for t in draw(st.lists(tensors(n * ITEM), max_size=2)):
        req.inputs.append(t)
    for _ in range(draw(st.integers(0, 2))):
        size = max(0, draw(st.sampled_from([n * ITEM * 4, n * ITEM, n * ITEM * 4 - 1, n * ITEM * 4 + 3, 0, 7])))
        seed = draw(st.integers(0, 2**32))
        raw_kind = draw(st.sampled_from(["pixels", "bytes", "special"]))
        rng = np.random.default_rng(seed)
        if raw_kind == "pixels" and size % 4 == 0:
            buf = rng.random(size // 4, dtype=np.float32).astype("<f4").tobytes()
        elif raw_kind == "special" and size % 4 == 0 and size:
            arr = rng.random(size // 4, dtype=np.float32)
            arr[rng.integers(arr.size)] = rng.choice([np.nan, np.inf, -1.0, 2.0])
            buf = arr.astype("<f4").tobytes()
        else:
            buf = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        req.raw_input_contents.append(buf)
    for name in draw(st.lists(st.sampled_from(list(CONTRACT.output_names)) | names, max_size=3)):
        req.outputs.add(name=name)
    return req


def _check_decoded(req: pb.ModelInferRequest, d) -> None:
    """Invariants of every successful decode, recomputed independently of the codec."""
    assert req.model_name == "tiny" and req.model_version in ("", "1")
    assert len(req.inputs) == 1 and req.inputs[0].name == "input"
    inp = req.inputs[0]
    n = int(inp.shape[0])
    assert list(inp.shape) == [n, 1, 4, 4] and 1 <= n <= CONTRACT.max_batch_items
    assert d.x.dtype == np.float32 and d.x.shape == (n, 1, 4, 4) and d.x.flags["C_CONTIGUOUS"]
    assert np.isfinite(d.x).all() and d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert d.raw == bool(req.raw_input_contents) and d.datatype == inp.datatype
    if d.raw:
        dtype = "<f4" if inp.datatype == "FP32" else "u1"
        sent = np.frombuffer(req.raw_input_contents[0], dtype=dtype).reshape(n, 1, 4, 4)
    else:
        field = "fp32_contents" if inp.datatype == "FP32" else "uint_contents"
        sent = np.asarray(getattr(inp.contents, field), dtype=np.float32 if inp.datatype == "FP32" else np.uint8)
        sent = sent.reshape(n, 1, 4, 4)
    want = sent.astype(np.float32) / np.float32(255.0) if inp.datatype == "UINT8" else sent.astype(np.float32)
    np.testing.assert_array_equal(d.x, want)
    assert set(d.outputs) <= set(CONTRACT.output_names) and len(set(d.outputs)) == len(d.outputs)
    assert d.outputs == (tuple(dict.fromkeys(o.name for o in req.outputs)) if req.outputs else CONTRACT.output_names)


@PROFILE
@given(requests())
def test_any_request_decodes_or_raises_a_protocol_error(req):
    req, decoded = decoded_or_refused(req, CONTRACT)
    if decoded is not None:
        _check_decoded(req, decoded)


def decoded_or_refused(req: pb.ModelInferRequest, contract: InputContract):
    """``req`` as the server sees it (after the wire) and its decoding, or None when the codec refused
    it -- with its own ProtocolError, INVALID_ARGUMENT or NOT_FOUND and a message, never another error."""
    req = pb.ModelInferRequest.FromString(req.SerializeToString())
    try:
        return req, decode_infer(req, contract)
    except ProtocolError as exc:
        assert exc.code in ("INVALID_ARGUMENT", "NOT_FOUND"), exc.code
        assert exc.message and str(exc) == exc.message
        return req, None


@st.composite
def valid_requests(draw):
    n = draw(st.integers(1, CONTRACT.max_batch_items))
    datatype = draw(st.sampled_from(["FP32", "UINT8"]))
    raw = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    if datatype == "FP32":
        x = rng.random((n, 1, 4, 4), dtype=np.float32)
        x.flat[rng.integers(x.size)] = draw(st.sampled_from([0.0, 1.0, -0.0, 0.5]))
    else:
        x = rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
    req = pb.ModelInferRequest(model_name="tiny", model_version=draw(st.sampled_from(["", "1"])), id=draw(unicode))
    t = req.inputs.add(name="input", datatype=datatype, shape=[n, 1, 4, 4])
    if raw:
        req.raw_input_contents.append(x.astype("<f4" if datatype == "FP32" else "u1").tobytes())
    elif datatype == "FP32":
        t.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        t.contents.uint_contents.extend(x.ravel().tolist())
    for name in draw(st.lists(st.sampled_from(list(CONTRACT.output_names)), max_size=3)):
        req.outputs.add(name=name)
    return req, x


def _mutations(req: pb.ModelInferRequest, rng: np.random.Generator):
    """(name, mutated copy, expected code, needle in the message) for each known defect."""
    def copy():
        r = pb.ModelInferRequest()
        r.CopyFrom(req)
        return r

    inp = req.inputs[0]
    n = int(inp.shape[0])
    raw = bool(req.raw_input_contents)
    out = []
    r = copy(); r.model_name = "tiny\u00e9"; out.append(("model", r, "NOT_FOUND", "unknown model"))
    r = copy(); r.model_version = "2"; out.append(("version", r, "NOT_FOUND", "no version"))
    r = copy(); r.inputs[0].name = "inp\u00fct"; out.append(("input name", r, "INVALID_ARGUMENT", "unknown input"))
    r = copy(); r.inputs[0].datatype = "FP64"; out.append(("datatype", r, "INVALID_ARGUMENT", "not supported"))
    r = copy(); r.inputs[0].shape[0] = CONTRACT.max_batch_items + 1 + int(rng.integers(0, 2**40))
    out.append(("batch over limit", r, "INVALID_ARGUMENT", "exceeds the limit"))
    r = copy(); r.inputs[0].shape[0] = -int(rng.integers(0, 2**62)); out.append(("batch <= 0", r, "INVALID_ARGUMENT", "at least 1"))
    r = copy(); r.inputs[0].shape[2] = 2**33; out.append(("item shape", r, "INVALID_ARGUMENT", "does not match"))
    r = copy(); r.inputs[0].shape.append(1); out.append(("rank", r, "INVALID_ARGUMENT", "does not match"))
    r = copy(); r.inputs.add(name="input", datatype="FP32", shape=[1]); out.append(("two inputs", r, "INVALID_ARGUMENT", "exactly 1"))
    r = copy(); del r.inputs[:]; out.append(("no input", r, "INVALID_ARGUMENT", "exactly 1"))
    r = copy(); r.outputs.add(name="probabilities\u2603"); out.append(("output", r, "INVALID_ARGUMENT", "unknown requested output"))
    if raw:
        r = copy(); r.raw_input_contents[0] = r.raw_input_contents[0][:-1]; out.append(("short raw", r, "INVALID_ARGUMENT", "bytes"))
        r = copy(); r.raw_input_contents.append(b"\0"); out.append(("two raws", r, "INVALID_ARGUMENT", "entries"))
        r = copy(); r.inputs[0].contents.fp32_contents.append(0.5); out.append(("raw+typed", r, "INVALID_ARGUMENT", "both"))
        if inp.datatype == "FP32":
            r = copy()
            arr = np.frombuffer(r.raw_input_contents[0], "<f4").copy()
            arr[rng.integers(arr.size)] = rng.choice([np.nan, np.inf])
            r.raw_input_contents[0] = arr.tobytes(); out.append(("nan", r, "INVALID_ARGUMENT", "NaN or Inf"))
            arr[:] = 0.5
            arr[rng.integers(arr.size)] = rng.choice([1.0001, -0.001, 255.0])
            r = copy(); r.raw_input_contents[0] = arr.tobytes(); out.append(("range", r, "INVALID_ARGUMENT", "outside the declared range"))
    else:
        field = "fp32_contents" if inp.datatype == "FP32" else "uint_contents"
        r = copy(); del getattr(r.inputs[0].contents, field)[-1]; out.append(("short typed", r, "INVALID_ARGUMENT", "values"))
        r = copy(); r.inputs[0].contents.int64_contents.append(1); out.append(("wrong field", r, "INVALID_ARGUMENT", "contents."))
        if inp.datatype == "UINT8":
            r = copy(); r.inputs[0].contents.uint_contents[int(rng.integers(n * ITEM))] = 256 + int(rng.integers(2**31))
            out.append(("uint8 > 255", r, "INVALID_ARGUMENT", "exceeds 255"))
    return out


@PROFILE
@given(valid_requests(), st.integers(0, 2**32))
def test_valid_requests_decode_exactly_and_each_defect_is_refused(case, seed):
    req, x = case
    d = decode_infer(req, CONTRACT)
    want = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x
    np.testing.assert_array_equal(d.x, want)
    _check_decoded(req, d)
    for name, bad, code, needle in _mutations(req, np.random.default_rng(seed)):
        try:
            decode_infer(pb.ModelInferRequest.FromString(bad.SerializeToString()), CONTRACT)
        except ProtocolError as exc:
            assert exc.code == code and needle in exc.message, (name, exc.code, exc.message)
        else:
            raise AssertionError(f"mutation {name!r} was accepted")


NORMALIZED = dataclasses.replace(CONTRACT, client_values=ClientValues((0.45,), (0.25,)))


@PROFILE
@given(requests())
def test_any_request_to_a_normalized_contract_decodes_to_pixels_or_raises_a_protocol_error(req):
    """A bundle whose clients normalize (input.normalized): whatever arrives either becomes finite
    pixels inside the value range -- FP32 values turned back with ``x * std + mean`` (float rounding
    at the range's ends clipped), UINT8 as pixels -- or is refused with the codec's ProtocolError."""
    req, d = decoded_or_refused(req, NORMALIZED)
    if d is None:
        return
    x = d.x
    assert x.dtype == np.float32 and x.flags["C_CONTIGUOUS"] and np.isfinite(x).all()
    assert x.min() >= 0.0 and x.max() <= 1.0
    inp = req.inputs[0]
    if inp.datatype == "FP32":
        sent = (np.frombuffer(req.raw_input_contents[0], dtype="<f4") if d.raw
                else np.asarray(inp.contents.fp32_contents, dtype=np.float32)).reshape(x.shape)
        np.testing.assert_allclose(x, np.clip(sent * np.float32(0.25) + np.float32(0.45), 0, 1), atol=1e-6)
