"""Every Open Inference Protocol RPC through the real tritonclient against a real proxy.

Answers must equal ONNX Runtime run directly on the same input; typed (non-raw) requests are
sent with the raw generated stub because tritonclient always sends raw contents.
"""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

RNG = np.random.default_rng(0)


def images(n: int) -> np.ndarray:
    return RNG.random((n, 1, 28, 28), dtype=np.float32)


def triton_infer(url: str, x: np.ndarray, datatype: str = "FP32", outputs=None, request_id: str = ""):
    client = tc.InferenceServerClient(url)
    inp = tc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    req_out = [tc.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer("tiny", [inp], outputs=req_out, request_id=request_id)


def test_health_rpcs_and_metadata(proxy):
    client = tc.InferenceServerClient(proxy.url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "robustgate" and meta.version
    mm = client.get_model_metadata("tiny")
    assert mm.name == "tiny" and list(mm.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in mm.inputs] == [("input", "FP32", [-1, 1, 28, 28])]
    outs = {t.name: (t.datatype, list(t.shape)) for t in mm.outputs}
    assert outs == {"logits": ("FP32", [-1, 10]), "robustgate_verdict": ("INT32", [-1])}
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "nope" in err.value.message()


def test_fp32_raw_matches_onnxruntime(proxy, ort_logits):
    x = images(3)
    res = triton_infer(proxy.url, x, request_id="req-7")
    np.testing.assert_allclose(res.as_numpy("logits"), ort_logits(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), [0, 0, 0])
    r = res.get_response()
    assert r.id == "req-7" and r.model_name == "tiny"
    assert r.parameters["robustgate_verdicts"].string_param == "accepted,accepted,accepted"
    assert r.parameters["robustgate_reasons"].string_param == ",,"


def test_uint8_raw_is_scaled_by_1_over_255(proxy, ort_logits):
    u = RNG.integers(0, 256, size=(2, 1, 28, 28), dtype=np.uint8)
    res = triton_infer(proxy.url, u, datatype="UINT8")
    np.testing.assert_allclose(res.as_numpy("logits"), ort_logits(u.astype(np.float32) / 255.0), rtol=1e-5, atol=1e-6)


def test_requested_outputs_are_honoured(proxy, ort_logits):
    x = images(1)
    res = triton_infer(proxy.url, x, outputs=["robustgate_verdict"])
    assert [o.name for o in res.get_response().outputs] == ["robustgate_verdict"]
    assert res.as_numpy("logits") is None
    res = triton_infer(proxy.url, x, outputs=["logits"])
    assert [o.name for o in res.get_response().outputs] == ["logits"]


def typed_request(x: np.ndarray, datatype: str = "FP32") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny", id="typed-1")
    t = req.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    if datatype == "FP32":
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    else:
        t.contents.uint_contents.extend(x.reshape(-1).astype(np.uint32).tolist())
    return req


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_typed_contents_answer_typed(proxy, ort_logits, datatype):
    if datatype == "FP32":
        x = images(2)
        want = ort_logits(x)
    else:
        x = RNG.integers(0, 256, size=(2, 1, 28, 28), dtype=np.uint8)
        want = ort_logits(x.astype(np.float32) / 255.0)
    with grpc.insecure_channel(proxy.url) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(typed_request(x, datatype), timeout=30)
    assert len(resp.raw_output_contents) == 0 and resp.id == "typed-1"
    outs = {o.name: o for o in resp.outputs}
    logits = np.asarray(outs["logits"].contents.fp32_contents, np.float32).reshape(list(outs["logits"].shape))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    assert list(outs["robustgate_verdict"].contents.int_contents) == [0, 0]


def test_concurrent_distinct_requests_get_their_own_answers(start_proxy, ort_logits):
    p = start_proxy(batching={"max_batch_size": 8, "max_queue_delay_ms": 20})
    xs = [images(1 + i % 3) for i in range(24)]

    def one(x):
        return triton_infer(p.url, x).as_numpy("logits")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, xs))
    for x, got in zip(xs, answers):
        np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
    # coalescing really happened: some executed batch held more than one request's items
    batch_sizes = p.server.metrics.registry.get_sample_value("robustgate_batch_size_count")
    assert batch_sizes < len(xs)


def test_batching_disabled_runs_each_request_alone(start_proxy, ort_logits):
    p = start_proxy(batching={"enabled": False})
    xs = [images(2) for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda x: triton_infer(p.url, x).as_numpy("logits"), xs))
    for x, got in zip(xs, answers):
        np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_batch_size_count") == 6
    assert reg.get_sample_value("robustgate_batch_size_sum") == 12


def test_triton_model_config_for_perf_analyzer(proxy):
    client = tc.InferenceServerClient(proxy.url)
    cfg = client.get_model_config("tiny").config
    assert cfg.name == "tiny" and cfg.max_batch_size == 256
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [1, 28, 28])]
    assert [o.name for o in cfg.output] == ["logits", "robustgate_verdict"]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_server_live()  # the OIP methods still resolve beside the extra handler
