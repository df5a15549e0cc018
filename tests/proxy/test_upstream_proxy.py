"""End to end: the real tritonclient.grpc client -> robustgate proxy (backend.kind=upstream) ->
a real Seldon MLServer serving the proxy test bundle's ONNX backbone, all on loopback.

Answers through the proxy equal the upstream's direct answers; the client's deadline reaches the
upstream call; the upstream stopped mid-test makes the proxy answer UNAVAILABLE and report not
ready; the upstream restarted on the same port brings readiness and answers back.
"""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

import harness  # tests/proxy/upstream (pytest pythonpath)
from harness import wait_until


SLOW_S = 5.0


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)  # [n, 1, 28, 28]


def triton_infer(client: tc.InferenceServerClient, model: str, x: np.ndarray, **kwargs) -> dict[str, np.ndarray]:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], **kwargs)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}


def upstream_errors(metrics_port: int) -> dict[str, float]:
    """``robustgate_upstream_errors_total`` by code, scraped from the proxy's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "robustgate_upstream_errors_total":
                out[sample.labels["code"]] = sample.value
    return out


@pytest.fixture
def mlserver(tmp_path, proxy_bundle):
    onnx_file = proxy_bundle / "backbone.onnx"
    server = harness.MLServerProcess(
        tmp_path / "mlserver",
        {"tiny": {"onnx": onnx_file},
         "tiny-slow": {"onnx": onnx_file, "sleep_s": SLOW_S, "cancel_log": tmp_path / "cancelled.log"}},
    )
    server.start()
    yield server
    server.stop()


def health(url: str) -> int:
    """The proxy's grpc.health.v1 status for the whole server ("")."""
    with grpc.insecure_channel(url) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def upstream_section(url: str, model_name: str = "tiny", **extra) -> dict:
    return {"kind": "upstream", "upstream": {"url": url, "model_name": model_name, "retries": 1, "backoff_s": 0.01,
                                             "health_interval_s": 0.2, **extra}}


@pytest.mark.parametrize("batching", [True, False])
def test_answers_through_the_proxy_equal_the_upstreams(start_proxy, mlserver, ort_logits, batching):
    proxy = start_proxy(backend=upstream_section(mlserver.url), batching={"enabled": batching})
    with tc.InferenceServerClient(proxy.url) as via_proxy, tc.InferenceServerClient(mlserver.url) as direct:
        assert via_proxy.is_server_ready() and via_proxy.is_model_ready("tiny")
        for n, seed in [(1, 0), (5, 1)]:
            x = images(n, seed)
            got = triton_infer(via_proxy, "tiny", x)
            want = triton_infer(direct, "tiny", x)["logits"]
            np.testing.assert_array_equal(got["logits"], want)
            np.testing.assert_allclose(got["logits"], ort_logits(x), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got["robustgate_verdict"], np.zeros(n, dtype=np.int32))


def test_a_triton_upstreams_max_batch_size_bounds_what_the_proxy_sends(start_proxy, ort_logits):
    """The upstream is a robustgate proxy, which serves Triton's ModelConfig (max_batch_size =
    limits.max_batch_items, 4) and refuses larger requests as Triton does. The front coalesces 12
    concurrent batch-1 calls and takes a 10-item call: each goes upstream in requests of at most 4 items.
    With the bound overridden (max_batch_items 64) the same 10-item call is refused upstream."""
    from concurrent.futures import ThreadPoolExecutor

    upstream = start_proxy(limits={"max_batch_items": 4}, batching={"enabled": False})
    front = start_proxy(backend=upstream_section(upstream.url),
                        batching={"max_batch_size": 32, "max_queue_delay_ms": 50})
    x = images(12, seed=21)

    def one(i: int) -> np.ndarray:
        with tc.InferenceServerClient(front.url) as client:
            return triton_infer(client, "tiny", x[i:i + 1])["logits"]

    with ThreadPoolExecutor(12) as pool:
        got = np.concatenate(list(pool.map(one, range(12))))
    np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
    with tc.InferenceServerClient(front.url) as client:
        np.testing.assert_allclose(triton_infer(client, "tiny", x[:10])["logits"], ort_logits(x[:10]),
                                   rtol=1e-5, atol=1e-6)
    assert front.server.backend.max_batch_items == 4
    # server.warmup's default: the in-process upstream warms, the forwarding front leaves its model server alone
    assert upstream.server.warmup_enabled and not front.server.warmup_enabled

    unbounded = start_proxy(backend=upstream_section(upstream.url, max_batch_items=64))
    with tc.InferenceServerClient(unbounded.url) as client:
        with pytest.raises(InferenceServerException) as err:
            triton_infer(client, "tiny", x[:10])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (err.value.status(), str(err.value))


def test_client_deadline_reaches_the_upstream_call(start_proxy, mlserver):
    """The upstream sleeps SLOW_S; the proxy's own timeout_s is 30 s; a 1.5 s client deadline
    must still end the proxy's upstream call, which MLServer sees as a cancelled request."""
    proxy = start_proxy(backend=upstream_section(mlserver.url, model_name="tiny-slow", timeout_s=30.0),
                        model_name="tiny-slow", batching={"enabled": False})
    with tc.InferenceServerClient(proxy.url) as client:
        with pytest.raises(InferenceServerException) as err:
            triton_infer(client, "tiny-slow", images(1, 0), client_timeout=1.5)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED", (err.value.status(), str(err.value))
    log = mlserver.models["tiny-slow"]["cancel_log"]
    wait_until(lambda: log.exists() and "cancelled 1 item(s)" in log.read_text(), timeout_s=10.0,
               what="MLServer cancelling the proxy's upstream call")


def test_upstream_stopped_then_restarted(start_proxy, mlserver):
    proxy = start_proxy(backend=upstream_section(mlserver.url))
    x = images(3, seed=11)
    with tc.InferenceServerClient(proxy.url) as client:
        before = triton_infer(client, "tiny", x)["logits"]

        mlserver.stop()
        with pytest.raises(InferenceServerException) as err:
            triton_infer(client, "tiny", x)
        assert err.value.status() == "StatusCode.UNAVAILABLE", (err.value.status(), str(err.value))
        wait_until(lambda: not client.is_server_ready(), what="ServerReady false with the upstream down")
        assert not client.is_model_ready("tiny")
        wait_until(lambda: health(proxy.url) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   what="grpc.health.v1 NOT_SERVING with the upstream down")
        assert upstream_errors(proxy.metrics_port).get("UNAVAILABLE", 0) >= 1

        mlserver.start()  # same gRPC port
        wait_until(client.is_server_ready, what="ServerReady true once the upstream returned")
        np.testing.assert_array_equal(triton_infer(client, "tiny", x)["logits"], before)
        wait_until(lambda: health(proxy.url) == health_pb2.HealthCheckResponse.SERVING,
                   what="grpc.health.v1 SERVING once the upstream returned")


def test_proxy_started_before_its_upstream(start_proxy, tmp_path, proxy_bundle, ort_logits):
    """The upstream is not up yet when the proxy starts: not ready and UNAVAILABLE, then both fine."""
    server = harness.MLServerProcess(tmp_path / "late", {"tiny": {"onnx": proxy_bundle / "backbone.onnx"}})
    proxy = start_proxy(backend=upstream_section(server.url))
    x = images(2, seed=12)
    try:
        with tc.InferenceServerClient(proxy.url) as client:
            assert client.is_server_live()
            assert not client.is_server_ready()
            with pytest.raises(InferenceServerException) as err:
                triton_infer(client, "tiny", x)
            assert err.value.status() == "StatusCode.UNAVAILABLE", (err.value.status(), str(err.value))

            server.start()
            wait_until(client.is_server_ready, what="ServerReady once the upstream came up")
            got = triton_infer(client, "tiny", x)["logits"]
            np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
            meta = client.get_model_metadata("tiny", as_json=True)
            assert meta["inputs"][0]["name"] == "input"
    finally:
        server.stop()


def test_upstream_batch_workers_keep_the_loop_priority(start_proxy, mlserver):
    """server.compute_nice lowers the threads that compute; an upstream backend's batch workers wait
    on the network instead, and keep the event loop's priority (proxy/server.py)."""
    import asyncio
    import os
    import threading

    proxy = start_proxy(backend=upstream_section(mlserver.url), server={"compute_nice": 6})
    with tc.InferenceServerClient(proxy.url) as client:
        triton_infer(client, "tiny", images(1, 0))

    async def worker_and_loop() -> tuple[int, int]:
        batcher = proxy.server.batcher
        worker = await batcher._threads.run(asyncio.get_running_loop(), threading.get_native_id)
        return worker, threading.get_native_id()

    worker, loop = proxy.call(worker_and_loop())
    assert worker != loop
    assert os.getpriority(os.PRIO_PROCESS, worker) == os.getpriority(os.PRIO_PROCESS, loop)
