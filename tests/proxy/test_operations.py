"""Operations: grpc health, reflection, /metrics over HTTP, drain, TLS and mutual TLS."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from scrape import scrape  # tests/helpers
from tritonclient.utils import InferenceServerException

X = np.full((2, 1, 28, 28), 0.4, np.float32)


def infer(client: tc.InferenceServerClient, x=X):
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tiny", [inp])


def health(url: str, service: str):
    with grpc.insecure_channel(url) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_service_and_drain(start_proxy):
    p = start_proxy()
    assert health(p.url, "") == health_pb2.HealthCheckResponse.SERVING
    assert health(p.url, "inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING
    assert health(p.url, "liveness") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health(p.url, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    p.call(p.server.begin_drain())
    assert health(p.url, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(p.url, "inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.NOT_SERVING
    client = tc.InferenceServerClient(p.url)
    assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("tiny")


def test_reflection_lists_and_describes_the_service(proxy):
    with grpc.insecure_channel(proxy.url) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        svc = descriptor_pool.DescriptorPool(db).FindServiceByName("inference.GRPCInferenceService")
        assert {m.name for m in svc.methods} == {
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}


def test_metrics_endpoint_counts_requests(proxy):
    before = scrape(proxy.metrics_port)
    assert before["robustgate_requests_total"][frozenset({("outcome", "accepted")})] == 0
    client = tc.InferenceServerClient(proxy.url)
    infer(client)
    infer(client, X[:1])
    with pytest.raises(InferenceServerException):
        infer(client, X + 1.0)  # out of range
    after = scrape(proxy.metrics_port)
    assert after["robustgate_requests_total"][frozenset({("outcome", "accepted")})] == 2
    assert after["robustgate_requests_total"][frozenset({("outcome", "invalid")})] == 1
    assert after["robustgate_items_total"][frozenset({("verdict", "accepted")})] == 3
    assert after["robustgate_request_duration_seconds_count"][frozenset()] == 3
    assert after["robustgate_batch_size_sum"][frozenset()] == 3
    for stage in ("decode", "queue", "classify", "encode"):
        assert after["robustgate_stage_duration_seconds_count"][frozenset({("stage", stage)})] >= 2
    assert after["robustgate_queue_depth"][frozenset()] == 0
    (labels,) = after["robustgate_build_info"]
    assert dict(labels)["bundle"] == "tiny" and dict(labels)["revision"] == "test"
    for outcome in ("upstream_error", "deadline_exceeded", "resource_exhausted", "not_found", "internal", "flagged"):
        assert frozenset({("outcome", outcome)}) in after["robustgate_requests_total"]


def _client(port: int, pki: Path, cert: str | None) -> tc.InferenceServerClient:
    kw = {"private_key": str(pki / f"{cert}.key"), "certificate_chain": str(pki / f"{cert}.pem")} if cert else {}
    return tc.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(pki / "ca.pem"), **kw)


def test_tls(start_proxy, pki, ort_logits):
    p = start_proxy(server={"tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")}})
    res = infer(_client(p.port, pki, None))
    np.testing.assert_allclose(res.as_numpy("logits"), ort_logits(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException):  # plaintext against a TLS port
        tc.InferenceServerClient(p.url).is_server_live()


def test_mutual_tls_refuses_clients_without_a_valid_certificate(start_proxy, pki, ort_logits):
    p = start_proxy(server={"tls": {
        "cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
        "client_ca": str(pki / "ca.pem"), "require_client_cert": True,
    }})
    res = infer(_client(p.port, pki, "client"))
    np.testing.assert_allclose(res.as_numpy("logits"), ort_logits(X), rtol=1e-5, atol=1e-6)
    for cert in (None, "intruder"):
        with pytest.raises(InferenceServerException) as err:
            _client(p.port, pki, cert).is_server_live()
        assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert _client(p.port, pki, "client").is_server_ready()
