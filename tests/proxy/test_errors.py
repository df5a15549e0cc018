"""Malformed requests: each answers the documented status with a message naming the problem, and
the server keeps serving (a good request right after each one is answered correctly)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

GOOD = np.full((1, 1, 28, 28), 0.5, np.float32)


@pytest.fixture(scope="module")
def limited(launch):
    p = launch(limits={"max_batch_items": 4})
    yield p
    p.stop()


def raw_request(x: np.ndarray, datatype="FP32", shape=None, name="input", model="tiny", version="") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name=name, datatype=datatype, shape=list(x.shape if shape is None else shape))
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return req


def typed_fp32(values, shape) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(shape))
    t.contents.fp32_contents.extend(values)
    return req


def _cases():
    ok = GOOD
    nan = GOOD.copy()
    nan[0, 0, 3, 3] = np.nan
    inf = GOOD.copy()
    inf[0, 0, 0, 0] = np.inf
    big = GOOD.copy()
    big[0, 0, 1, 1] = 1.5
    neg = GOOD.copy() - 0.7

    both = raw_request(ok)
    both.inputs[0].contents.fp32_contents.extend(ok.reshape(-1).tolist())
    two_inputs = raw_request(ok)
    two_inputs.inputs.add(name="extra", datatype="FP32", shape=[1])
    two_inputs.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    no_inputs = pb.ModelInferRequest(model_name="tiny")
    wrong_field = pb.ModelInferRequest(model_name="tiny")
    t = wrong_field.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    t.contents.int_contents.extend([0] * 784)
    u8_big = pb.ModelInferRequest(model_name="tiny")
    t = u8_big.inputs.add(name="input", datatype="UINT8", shape=[1, 1, 28, 28])
    t.contents.uint_contents.extend([0] * 783 + [300])
    unknown_out = raw_request(ok)
    unknown_out.outputs.add(name="probabilities")
    return {
        "wrong datatype": (raw_request(ok.astype(np.float64), datatype="FP64"), "INVALID_ARGUMENT", "FP64"),
        "wrong item shape": (raw_request(np.zeros((1, 1, 32, 32), np.float32)), "INVALID_ARGUMENT", "[N, 1, 28, 28]"),
        "wrong rank": (raw_request(np.zeros((1, 784), np.float32)), "INVALID_ARGUMENT", "shape [1, 784]"),
        "typed count mismatch": (typed_fp32([0.5] * 700, (1, 1, 28, 28)), "INVALID_ARGUMENT", "holds 700 values"),
        "raw length mismatch": (raw_request(ok, shape=[2, 1, 28, 28]), "INVALID_ARGUMENT", "3136 bytes"),
        "raw and typed": (both, "INVALID_ARGUMENT", "both raw_input_contents and typed"),
        "typed in the wrong field": (wrong_field, "INVALID_ARGUMENT", "contents.int_contents"),
        "uint8 over 255": (u8_big, "INVALID_ARGUMENT", "300"),
        "NaN": (raw_request(nan), "INVALID_ARGUMENT", "NaN or Inf"),
        "Inf": (raw_request(inf), "INVALID_ARGUMENT", "NaN or Inf"),
        "above range": (raw_request(big), "INVALID_ARGUMENT", "outside the declared range"),
        "below range (normalized input)": (raw_request(neg), "INVALID_ARGUMENT", "outside the declared range"),
        "batch over limit": (raw_request(np.zeros((5, 1, 28, 28), np.float32)), "INVALID_ARGUMENT", "limits.max_batch_items"),
        "empty batch": (raw_request(np.zeros((0, 1, 28, 28), np.float32)), "INVALID_ARGUMENT", "at least 1"),
        "two inputs": (two_inputs, "INVALID_ARGUMENT", "exactly 1 input"),
        "no inputs": (no_inputs, "INVALID_ARGUMENT", "exactly 1 input"),
        "wrong input name": (raw_request(ok, name="image"), "INVALID_ARGUMENT", "'image'"),
        "unknown output": (unknown_out, "INVALID_ARGUMENT", "'probabilities'"),
        "unknown model": (raw_request(ok, model="resnet"), "NOT_FOUND", "'resnet'"),
        "unknown version": (raw_request(ok, version="7"), "NOT_FOUND", "'7'"),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request_answers_status_and_server_goes_on(limited, ort_logits, case):
    request, code, needle = CASES[case]
    with grpc.insecure_channel(limited.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.code() == getattr(grpc.StatusCode, code), err.value.details()
        assert needle in err.value.details()
        ok = stub.ModelInfer(raw_request(GOOD), timeout=30)
    logits = np.frombuffer(ok.raw_output_contents[0], np.float32).reshape(1, 10)
    np.testing.assert_allclose(logits, ort_logits(GOOD), rtol=1e-5, atol=1e-6)


def test_tritonclient_sees_the_same_errors(limited):
    client = tc.InferenceServerClient(limited.url)
    inp = tc.InferInput("input", [1, 1, 28, 28], "INT32")
    inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "INT32" in err.value.message()
    reg = limited.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "invalid"}) >= 1
    assert client.is_server_ready()


def test_message_size_limit(start_proxy):
    p = start_proxy(server={"max_message_bytes": 16 * 1024})
    with grpc.insecure_channel(p.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(raw_request(GOOD), timeout=30)  # 3 KiB fits
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request(np.zeros((8, 1, 28, 28), np.float32)), timeout=30)  # 25 KiB
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
