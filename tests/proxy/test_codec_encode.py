"""The answer's wire bytes (codec.encode_infer_bytes: a cached fixed part + the per-request part)
parse to exactly the message codec.encode_infer builds, for raw and typed answers, every output
subset and order, detector scores, a radius, NaN rows and batch sizes; the cache stays bounded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.proxy import codec
from robustgate.proxy.codec import Answer, Decoded, InputContract, encode_infer, encode_infer_bytes


def contract(**kw) -> InputContract:
    base = dict(model_name="tiny", versions=("1", "2"), input_name="input", item_shape=(1, 4, 4),
                value_range=(0.0, 1.0), max_batch_items=8, logits_output="logits")
    return InputContract(**{**base, **kw})


def answer(n: int, k: int = 3, seed: int = 0, radius: bool = False) -> Answer:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    verdict = rng.integers(0, 3, n)
    logits[verdict == 2] = np.nan
    reasons = [None if v == 0 else "magnet" for v in verdict.tolist()]
    return Answer(logits=logits, verdict=verdict, reasons=reasons,
                  scores={"magnet": rng.random(n).astype(np.float32)},
                  radius=rng.random(n).astype(np.float32) if radius else None)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_bytes_parse_to_the_message_for_every_output_subset(raw, n):
    c = contract(detector_stages=("magnet",), has_ensemble=True)
    a = answer(n, radius=True)
    for size in range(1, len(c.output_names) + 1):
        for outputs in itertools.permutations(c.output_names, size):
            d = Decoded(x=np.zeros((n, 1, 4, 4), np.float32), raw=raw, outputs=outputs, request_id="req-7")
            for version in ("1", "2"):
                want = encode_infer(d, a, c, version)
                got = pb.ModelInferResponse.FromString(encode_infer_bytes(d, a, c, version))
                assert got == want, outputs
                # and again from the cache
                assert pb.ModelInferResponse.FromString(encode_infer_bytes(d, a, c, version)) == want


def test_known_verdict_names_and_missing_scores_encode_as_before():
    c = contract(detector_stages=("magnet", "other"), has_ensemble=True)
    a = answer(2)  # no radius, no "other" score: NaN outputs
    d = Decoded(x=np.zeros((2, 1, 4, 4), np.float32), raw=True, outputs=c.output_names)
    want = encode_infer(d, a, c, "1")
    a.verdict_names = [codec.VERDICT_NAMES[v] for v in a.verdict.tolist()]
    got = pb.ModelInferResponse.FromString(encode_infer_bytes(d, a, c, "1"))
    assert got.parameters == want.parameters and list(got.outputs) == list(want.outputs)
    for g, w in zip(got.raw_output_contents, want.raw_output_contents):
        np.testing.assert_array_equal(np.frombuffer(g, np.uint8), np.frombuffer(w, np.uint8))  # NaN bytes too


def test_the_head_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(codec, "MAX_RESPONSE_HEADS", 4)
    c = contract(max_batch_items=16)
    for n in range(1, 11):
        a = answer(n)
        d = Decoded(x=np.zeros((n, 1, 4, 4), np.float32), raw=True, outputs=c.output_names)
        assert pb.ModelInferResponse.FromString(encode_infer_bytes(d, a, c, "1")) == encode_infer(d, a, c, "1")
    assert len(c.response_heads) == 4


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("raw", [True, False])
def test_a_channels_last_request_decodes_into_the_pipelines_order(datatype, raw):
    """An NHWC bundle's contract: requests are [N, H, W, C] (raw or typed, FP32 or UINT8); the
    decoded batch is [N, C, H, W], contiguous, exactly the pixels sent; an NCHW request is refused
    naming the shape the model takes."""
    from robustgate.proxy.codec import ProtocolError, decode_infer

    c = contract(item_shape=(3, 4, 5), channels_last=True)
    assert c.wire_shape == (4, 5, 3)
    rng = np.random.default_rng(0)
    sent = rng.integers(0, 256, (2, 4, 5, 3)).astype(np.uint8)  # [N, H, W, C]
    values = sent if datatype == "UINT8" else (sent / np.float32(255.0)).astype(np.float32)

    def request(arr: np.ndarray) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="tiny")
        t = req.inputs.add(name="input", datatype=datatype, shape=list(arr.shape))
        if raw:
            req.raw_input_contents.append(arr.tobytes())
        elif datatype == "UINT8":
            t.contents.uint_contents.extend(arr.reshape(-1).tolist())
        else:
            t.contents.fp32_contents.extend(arr.reshape(-1).tolist())
        return req

    x = codec.decode_infer(request(values), c).x
    assert x.shape == (2, 3, 4, 5) and x.flags["C_CONTIGUOUS"] and x.dtype == np.float32
    np.testing.assert_array_equal(x, (sent / np.float32(255.0)).astype(np.float32).transpose(0, 3, 1, 2))
    with pytest.raises(ProtocolError, match=r"shape \[2, 3, 4, 5\] does not match \[N, 4, 5, 3\] \(channels last\)"):
        decode_infer(request(np.ascontiguousarray(values.transpose(0, 3, 1, 2))), c)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalized_requests_decode_to_pixels_per_channel(channels_last):
    """A contract whose clients normalize (the bundle's input.normalized): FP32 values turn back into
    pixels along the wire layout's channel axis; a boundary pixel's float rounding is clipped into the
    range; values that are no pixels are refused; UINT8 is taken as pixels."""
    from robustgate.models.client_values import ClientValues
    from robustgate.proxy.codec import ProtocolError, decode_infer

    norm = ClientValues((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    c = contract(item_shape=(3, 4, 5), channels_last=channels_last, client_values=norm)
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 3, 4, 5)).astype(np.float32)
    pixels[0, :, 0] = 0.0
    pixels[0, :, 1] = 1.0
    sent = ((pixels.astype(np.float64) - np.array(norm.mean)[:, None, None]) / np.array(norm.std)[:, None, None])
    sent = sent.astype(np.float32)  # [N, C, H, W]: channel 1's zeros come back as -3e-8
    wire = np.ascontiguousarray(sent.transpose(0, 2, 3, 1)) if channels_last else sent

    def request(arr: np.ndarray, datatype: str = "FP32") -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="tiny")
        req.inputs.add(name="input", datatype=datatype, shape=list(arr.shape))
        req.raw_input_contents.append(arr.tobytes())
        return req

    x = decode_infer(request(wire), c).x
    assert x.shape == (2, 3, 4, 5) and x.flags["C_CONTIGUOUS"] and x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x, pixels, atol=2e-7)
    bad = wire.copy()
    bad[1] = 5.0  # 5 * 0.229 + 0.485: pixels of about 1.6
    with pytest.raises(ProtocolError, match=r"normalized values are pixels in \[.*\], outside the declared range"):
        decode_infer(request(bad), c)
    u8 = np.round(pixels * 255).astype(np.uint8)
    u8_wire = np.ascontiguousarray(u8.transpose(0, 2, 3, 1)) if channels_last else u8
    np.testing.assert_array_equal(decode_infer(request(u8_wire, "UINT8"), c).x, u8 / np.float32(255.0))


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (0.0, 255.0), (-1.0, 1.0)])
def test_uint8_levels_span_the_value_range(value_range):
    """A UINT8 request's levels 0..255 are pixels spanning the bundle's value range: a model that takes
    0..255 floats gets the levels themselves (they were divided by 255 into [0, 1], a nearly black image
    that passed the range check), one that takes [-1, 1] gets -1..1; in [0, 1] they stay bit-identical to
    the dataset loaders' k / 255. models/levels.py maps them back onto the same levels."""
    from robustgate.models import levels

    lo, hi = value_range
    c = contract(item_shape=(1, 16, 16), value_range=value_range)
    sent = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="UINT8", shape=list(sent.shape))
    req.raw_input_contents.append(sent.tobytes())
    x = codec.decode_infer(req, c).x
    assert x.dtype == np.float32 and x.min() == lo and x.max() == hi
    np.testing.assert_allclose(x, lo + sent.astype(np.float64) * (hi - lo) / 255, rtol=0, atol=1e-6 * (hi - lo))
    if value_range == (0.0, 1.0):
        np.testing.assert_array_equal(x, sent / np.float32(255.0))
    np.testing.assert_array_equal(levels.levels(x, value_range), sent)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("normalized", [False, True])
def test_bgr_requests_decode_to_rgb_pixels(channels_last, datatype, normalized):
    """A contract whose clients speak BGR (the bundle's input.channel_order): FP32 values (normalized
    with BGR-order statistics or not) and UINT8 levels come out as RGB pixels in the pipeline's
    [N, C, H, W]; ClientValues.values is the inverse, as the upstream backend and the oracle use it."""
    from robustgate.models.client_values import ClientValues

    cv = ClientValues((0.4, 0.45, 0.5), (0.2, 0.25, 0.3), bgr=True) if normalized else ClientValues(bgr=True)
    c = contract(item_shape=(3, 4, 5), channels_last=channels_last, client_values=cv)
    rgb = (np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5)) / np.float32(255.0)).astype(np.float32)
    if datatype == "UINT8":
        wire = np.round(rgb[:, ::-1] * 255).astype(np.uint8)
    else:
        wire = cv.values(rgb)
        mean, std = np.array(cv.mean or (0.0,) * 3), np.array(cv.std or (1.0,) * 3)
        np.testing.assert_allclose(wire, (rgb[:, ::-1] - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    if channels_last:
        wire = wire.transpose(0, 2, 3, 1)
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype=datatype, shape=list(wire.shape))
    req.raw_input_contents.append(np.ascontiguousarray(wire).tobytes())
    x = codec.decode_infer(req, c).x
    assert x.shape == (2, 3, 4, 5) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x, rgb, atol=1e-6)
