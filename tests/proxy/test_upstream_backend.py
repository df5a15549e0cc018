"""UpstreamBackend against a real Seldon MLServer (subprocess on loopback) serving a tiny ONNX CNN.

Covers: logits equal to MLServer's own answer and to in-process ONNX Runtime; metadata; many
threads sharing the pooled channel each get their own rows; deadline propagation against a slow
upstream; malformed upstream answers -> INTERNAL; the upstream's own status passed through;
the upstream stopped mid-test -> UNAVAILABLE and readiness false, restarted on the same port ->
readiness true and answers again; constructor validation.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

import harness  # tests/proxy/upstream (pytest pythonpath)
from harness import wait_until
from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc
from robustgate.proxy.backends.base import BackendError
from robustgate.proxy.backends.upstream import UpstreamBackend


SLOW_S = 3.0


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return harness.make_tiny_onnx(tmp_path_factory.mktemp("upstream_model") / "tiny.onnx")


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory, onnx_file):
    models = {
        "tiny": {"onnx": onnx_file},
        "slow": {"onnx": onnx_file, "sleep_s": SLOW_S},
        "drop_row": {"onnx": onnx_file, "fault": "drop_row"},
        "no_logits": {"onnx": onnx_file, "fault": "no_logits"},
        "fp64": {"onnx": onnx_file, "fault": "fp64"},
    }
    with harness.MLServerProcess(tmp_path_factory.mktemp("mlserver"), models) as server:
        yield server


@pytest.fixture
def backend(mlserver):
    b = UpstreamBackend(url=mlserver.url, model_name="tiny", health_interval_s=0.2)
    yield b
    b.close()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)  # [n, 1, 28, 28] in [0, 1)


@pytest.mark.parametrize("n", [1, 7])
def test_logits_equal_the_upstreams_direct_answer(mlserver, backend, onnx_file, n):
    x = images(n, seed=n)
    got = backend.infer(x)
    direct = harness.infer_direct(mlserver.url, "tiny", x)["logits"]
    assert got.dtype == np.float32 and got.shape == (n, harness.NUM_CLASSES)
    np.testing.assert_array_equal(got, direct)
    local = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-6)
    assert backend.ready()


def test_a_batch_over_the_upstreams_receive_limit_goes_as_several_requests(mlserver, backend, onnx_file):
    """MLServer keeps gRPC's 4 MiB receive limit: 1,500 items of [1, 28, 28] FP32 (4.7 MB) are refused
    in one request, and answered in the requests that max_request_bytes' default makes of them."""
    x = images(1500, seed=5)
    whole = UpstreamBackend(url=mlserver.url, model_name="tiny", max_request_bytes=64 << 20)
    try:
        with pytest.raises(BackendError) as err:
            whole.infer(x)
        assert err.value.code == "RESOURCE_EXHAUSTED", str(err.value)
    finally:
        whole.close()
    got = backend.infer(x)
    local = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-6)


def test_metadata_is_the_upstreams(backend):
    meta = backend.metadata()
    assert meta.name == "tiny"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("input", "FP32", (-1, 1, 28, 28))]
    assert ("logits", "FP32", (-1, harness.NUM_CLASSES)) in [(t.name, t.datatype, t.shape) for t in meta.outputs]


def test_concurrent_callers_each_get_their_own_rows(mlserver, backend):
    """Eight threads share the pooled channel; every answer matches its own request."""
    inputs = [images(1 + i % 3, seed=100 + i) for i in range(8)]
    expected = [harness.infer_direct(mlserver.url, "tiny", x)["logits"] for x in inputs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                results[i] = backend.infer(inputs[i])
                np.testing.assert_array_equal(results[i], expected[i])
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert sorted(results) == list(range(len(inputs)))


def test_client_deadline_propagates_to_a_slow_upstream(mlserver):
    b = UpstreamBackend(url=mlserver.url, model_name="slow", timeout_s=30.0)
    try:
        with pytest.raises(BackendError) as err:
            b.infer(images(1, 0), timeout=0.5)  # the client's remaining deadline wins over timeout_s
        assert err.value.code == "DEADLINE_EXCEEDED"
    finally:
        b.close()


def test_own_timeout_bounds_a_call_without_client_deadline(mlserver):
    b = UpstreamBackend(url=mlserver.url, model_name="slow", timeout_s=0.5)
    try:
        with pytest.raises(BackendError) as err:
            b.infer(images(2, 0))
        assert err.value.code == "DEADLINE_EXCEEDED"
    finally:
        b.close()


def test_expired_deadline_is_not_sent(backend):
    with pytest.raises(BackendError) as err:
        backend.infer(images(1, 0), timeout=0.0)
    assert err.value.code == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize(
    "model,message",
    [("drop_row", r"shape \[2, 10\]; expected \[3, 10\]"), ("no_logits", "no output 'logits'"),
     ("fp64", "datatype FP64")],
)
def test_malformed_upstream_answers_are_internal(mlserver, model, message):
    b = UpstreamBackend(url=mlserver.url, model_name=model)
    try:
        with pytest.raises(BackendError, match=message) as err:
            b.infer(images(3, 1))
        assert err.value.code == "INTERNAL"
    finally:
        b.close()


def test_upstream_status_passes_through(mlserver, backend):
    """A request the upstream itself refuses keeps the upstream's status code."""
    bad = images(2, 0).reshape(2, 1, 14, 56)  # wrong H, W: ONNX Runtime inside MLServer refuses it
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=list(bad.shape))
    req.raw_input_contents.append(bad.tobytes())
    with grpc.insecure_channel(mlserver.url) as channel:
        with pytest.raises(grpc.RpcError) as direct:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert direct.value.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(BackendError) as err:
        backend.infer(bad)
    assert err.value.code == direct.value.code().name


def test_unknown_model_is_the_upstreams_not_found(mlserver):
    b = UpstreamBackend(url=mlserver.url, model_name="no-such-model", health_interval_s=0.2)
    try:
        assert not b.ready()
        with pytest.raises(BackendError) as err:
            b.metadata()
        assert err.value.code == "NOT_FOUND"
    finally:
        b.close()


def test_no_upstream_is_unavailable_and_not_ready():
    port = harness.free_port()  # nothing listens there
    b = UpstreamBackend(url=f"127.0.0.1:{port}", model_name="tiny", retries=2, backoff_s=0.01)
    try:
        assert not b.ready()
        with pytest.raises(BackendError) as err:
            b.infer(images(1, 0))
        assert err.value.code == "UNAVAILABLE"
        assert "after 3 attempt(s)" in str(err.value)
    finally:
        b.close()


def test_upstream_stopped_mid_test_then_restarted_on_the_same_port(tmp_path, onnx_file):
    server = harness.MLServerProcess(tmp_path / "mlserver", {"tiny": {"onnx": onnx_file}})
    server.start()
    b = UpstreamBackend(url=server.url, model_name="tiny", retries=1, backoff_s=0.01, health_interval_s=0.2)
    try:
        x = images(4, seed=7)
        before = b.infer(x)
        assert b.ready()

        server.stop()
        with pytest.raises(BackendError) as err:
            b.infer(x)
        assert err.value.code == "UNAVAILABLE"
        assert not b.ready()  # set by the failed call, kept by the poller while the upstream is down
        time.sleep(0.5)  # a few poll intervals pass with the upstream down
        assert not b.ready()

        port = server.grpc_port
        server.start()
        assert server.grpc_port == port
        wait_until(b.ready, what="readiness after the upstream returned")
        np.testing.assert_array_equal(b.infer(x), before)
    finally:
        b.close()
        server.stop()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"url": "http://127.0.0.1:8001"}, "host:port"),
        ({"url": "127.0.0.1"}, "host:port"),
        ({"url": "127.0.0.1:0"}, "host:port"),
        ({"model_name": ""}, "model_name"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"backoff_s": -0.1}, "backoff_s"),
        ({"health_interval_s": 0}, "health_interval_s"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"max_batch_items": 0}, "max_batch_items"),
        ({"max_request_bytes": 1000}, "max_request_bytes"),
        ({"tls_cert": "/nonexistent.pem"}, "tls_cert and tls_key"),
        ({"tls_ca": "/nonexistent/ca.pem"}, "tls_ca: cannot read"),
    ],
)
def test_constructor_validates_its_config(kwargs, message):
    args = {"url": "127.0.0.1:1", "model_name": "tiny", **kwargs}
    with pytest.raises(ValueError, match=message):
        UpstreamBackend(**args)


def test_rejects_non_float32_input(backend):
    with pytest.raises(ValueError, match="float32"):
        backend.infer(images(1, 0).astype(np.float64))


def test_accepts_every_key_of_the_proxy_config(mlserver):
    """backend.upstream's keys are passed 1:1 (proxy/serve.py); a key added on one side only fails here."""
    from robustgate.proxy.config import UpstreamConfig

    keys = UpstreamConfig(url=mlserver.url, model_name="tiny", health_interval_s=0.5).model_dump()
    b = UpstreamBackend(**keys, max_message_bytes=4 << 20)
    try:
        assert b.ready()
        assert b.infer(images(2, 3)).shape == (2, harness.NUM_CLASSES)
    finally:
        b.close()


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 1, 28, 28), (1, 3, 224, 224)])  # length varints of 1, 2, 3 bytes
def test_hand_serialized_request_parses_to_the_message_protobuf_builds(shape):
    from robustgate.proxy.backends.upstream import encode_request

    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    x = np.asfortranarray(x)  # not C-contiguous: the pixels must still go in NCHW order
    got = pb.ModelInferRequest.FromString(encode_request(x, "pixels", "m", "3"))
    want = pb.ModelInferRequest(model_name="m", model_version="3")
    tensor = want.inputs.add(name="pixels", datatype="FP32")
    tensor.shape.extend(shape)
    want.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    assert got == want


def test_a_channels_last_upstream_gets_the_batch_as_nhwc():
    """``encode_request(..., channels_last=True)``: [M, C, H, W] -> a request of shape [M, H, W, C]
    holding the same pixels in that order (an NHWC upstream model); the backend takes it from the
    bundle's input.layout and refuses any other value."""
    from robustgate.proxy.backends.upstream import encode_request

    x = np.random.default_rng(1).random((2, 3, 4, 5), dtype=np.float32)
    got = pb.ModelInferRequest.FromString(encode_request(x, "pixels", "m", "", channels_last=True))
    assert list(got.inputs[0].shape) == [2, 4, 5, 3]
    sent = np.frombuffer(got.raw_input_contents[0], dtype="<f4").reshape(2, 4, 5, 3)
    np.testing.assert_array_equal(sent, x.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="layout must be NCHW or NHWC"):
        UpstreamBackend(url="127.0.0.1:1", model_name="m", layout="CHWN")
