"""Optional bearer-token check (server.auth.bearer_token_file) through the real tritonclient: every
RPC but the probes (ServerLive, ServerReady, grpc.health.v1) needs ``authorization: Bearer <token>``;
a missing or wrong token answers UNAUTHENTICATED; a reload rotates the token. The admin service
(``robustgate.admin.v1.Admin/Reload``) is off by default and, when on, answers only behind the token
or on its own loopback port (server.admin; docs/OPERATIONS.md "Threat model")."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import empty_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

X = np.full((2, 1, 28, 28), 0.3, np.float32)
TOKEN = "s3cret-token-0123456789+/="


def infer(client: tc.InferenceServerClient, **kwargs):
    inp = tc.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    return client.infer("tiny", [inp], **kwargs).as_numpy("logits")


def status(fn) -> str:
    with pytest.raises(InferenceServerException) as err:
        fn()
    return err.value.status()


@pytest.fixture
def secured(start_proxy, tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # surrounding whitespace is not part of the token
    p = start_proxy(server={"auth": {"bearer_token_file": str(path)}, "admin": {"enabled": True}})
    return p, path


def reload_call(channel: grpc.Channel):
    return channel.unary_unary("/robustgate.admin.v1.Admin/Reload", request_serializer=empty_pb2.Empty.SerializeToString,
                               response_deserializer=struct_pb2.Struct.FromString)


def test_token_required_except_for_the_probes(secured, ort_logits):
    p, _ = secured
    client = tc.InferenceServerClient(p.url)
    good = {"authorization": f"Bearer {TOKEN}"}
    np.testing.assert_allclose(infer(client, headers=good), ort_logits(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(infer(client, headers={"authorization": f"bearer {TOKEN}"}), ort_logits(X), rtol=1e-5, atol=1e-6)
    assert client.get_model_metadata("tiny", headers=good).name == "tiny"
    for headers in (None, {"authorization": f"Bearer {TOKEN}x"}, {"authorization": TOKEN},
                    {"authorization": f"Basic {TOKEN}"}, {"authorization": "Bearer "}, {"x-token": TOKEN}):
        assert status(lambda: infer(client, headers=headers)) == "StatusCode.UNAUTHENTICATED", headers
    assert status(lambda: client.get_model_metadata("tiny")) == "StatusCode.UNAUTHENTICATED"
    assert status(lambda: client.is_model_ready("tiny")) == "StatusCode.UNAUTHENTICATED"
    assert status(lambda: client.get_server_metadata()) == "StatusCode.UNAUTHENTICATED"
    # the probes answer without a token (Kubernetes gRPC probes cannot send headers)
    assert client.is_server_live() and client.is_server_ready()
    with grpc.insecure_channel(p.url) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/robustgate.admin.v1.Admin/Reload", request_serializer=empty_pb2.Empty.SerializeToString,
                           response_deserializer=struct_pb2.Struct.FromString)(empty_pb2.Empty(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.details()
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_auth_failures_total") == 10
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "accepted"}) == 2  # refused calls never ran


def test_reload_rotates_the_token(secured, ort_logits):
    p, path = secured
    cfg = p.cfg
    p.server.config_loader = lambda: cfg
    path.write_text("the-new-token")
    with grpc.insecure_channel(p.url) as ch:
        reload = ch.unary_unary("/robustgate.admin.v1.Admin/Reload", request_serializer=empty_pb2.Empty.SerializeToString,
                                response_deserializer=struct_pb2.Struct.FromString)
        reload(empty_pb2.Empty(), timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
    client = tc.InferenceServerClient(p.url)
    assert status(lambda: infer(client, headers={"authorization": f"Bearer {TOKEN}"})) == "StatusCode.UNAUTHENTICATED"
    np.testing.assert_allclose(infer(client, headers={"authorization": "Bearer the-new-token"}), ort_logits(X),
                               rtol=1e-5, atol=1e-6)


def test_empty_or_missing_token_file_is_a_config_error(tmp_path, proxy_bundle):
    from robustgate.proxy.config import ConfigError, load_config

    empty = tmp_path / "empty"
    empty.write_text("  \n")
    for path, needle in ((empty, "is empty"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(ConfigError) as err:
            load_config(None, environ={}, overrides={"bundle": str(proxy_bundle),
                                                      "server": {"auth": {"bearer_token_file": str(path)}}})
        assert "server.auth" in str(err.value) and needle in str(err.value)


def test_admin_is_unreachable_by_default(start_proxy):
    p = start_proxy()
    assert p.server.cfg.server.admin.enabled is False and p.server.admin_port is None
    with grpc.insecure_channel(p.url) as ch:
        with pytest.raises(grpc.RpcError) as err:
            reload_call(ch)(empty_pb2.Empty(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_admin_with_the_token_on_the_inference_port(secured):
    p, _ = secured
    p.server.config_loader = lambda: p.cfg
    with grpc.insecure_channel(p.url) as ch:
        with pytest.raises(grpc.RpcError) as err:
            reload_call(ch)(empty_pb2.Empty(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        summary = reload_call(ch)(empty_pb2.Empty(), timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
    assert summary["verdict_mode"] == "request"
    assert p.server.metrics.registry.get_sample_value("robustgate_reloads_total", {"result": "ok"}) == 1


def test_admin_on_its_own_loopback_port_without_a_token(start_proxy):
    p = start_proxy(server={"admin": {"enabled": True, "port": 0}})
    p.server.config_loader = lambda: p.cfg
    assert p.server.admin_port and p.server.admin_port != p.server.port
    with grpc.insecure_channel(p.url) as ch:  # not on the inference port
        with pytest.raises(grpc.RpcError) as err:
            reload_call(ch)(empty_pb2.Empty(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{p.server.admin_port}") as ch:
        assert reload_call(ch)(empty_pb2.Empty(), timeout=30)["failure_policy"] == "fail-closed"
        # and nothing but the admin service there
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(("admin", "needle"), [
    (True, "server: admin.enabled: the Reload RPC on the inference port needs a bearer token"),
    ({"enabled": True, "port": 9100, "host": "0.0.0.0"}, "server: admin.host: '0.0.0.0' is not loopback"),
])
def test_an_unguarded_admin_is_a_config_error(proxy_bundle, admin, needle):
    from robustgate.proxy.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "server": {"admin": admin}})
    assert needle in str(err.value)
    # the environment variable of older deployments means the same
    with pytest.raises(ConfigError, match="ROBUSTGATE_SERVER__ADMIN"):
        load_config(None, environ={"ROBUSTGATE_SERVER__ADMIN": "true"}, overrides={"bundle": str(proxy_bundle)})
