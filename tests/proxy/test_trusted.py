"""Trusted clients (server.trusted, outputs.trusted_policy; docs/OPERATIONS.md "Trusted clients") through the
real server on loopback: a client that proves it is trusted -- a trusted bearer token, a verified
client certificate with a trusted subject -- gets the trusted output policy and, with server.explain,
the detectors' scores and thresholds; every other client, whatever headers it claims, gets the
anonymous policy and no oracle."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc
from robustgate.proxy.config import ConfigError, load_config
from robustgate.proxy.identity import Trust

DARK = np.full((1, 1, 28, 28), 0.2, np.float32)  # accepted by the brightness detector
BRIGHT = np.full((1, 1, 28, 28), 0.8, np.float32)  # rejected by it
BRIGHTNESS = {"stages": [{"name": "brightness", "kind": "test_proxy_mean", "action": "reject", "threshold": 0.5}]}
TIERS = {"policy": "label", "trusted_policy": "logits"}  # anonymous: the label; trusted: the logits


@pytest.fixture
def tokens(tmp_path) -> dict[str, Path]:
    out = {}
    for name, token in (("trusted", "t-7f3a9c"), ("other_trusted", "t-51d0e2"), ("auth", "a-c4b1e8")):
        out[name] = tmp_path / f"{name}.token"
        out[name].write_text(f"{token}\n")
    return out


def bearer(path: Path) -> dict[str, str]:
    return {"authorization": f"Bearer {path.read_text().strip()}"}


def infer(client: tc.InferenceServerClient, x, headers=None):
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tiny", [inp], headers=headers)


def names(result) -> list[str]:
    return [o["name"] for o in result.get_response(as_json=True)["outputs"]]


def onehot(logits: np.ndarray) -> np.ndarray:
    out = np.zeros_like(logits)
    out[np.arange(len(logits)), logits.argmax(1)] = 1
    return out


def test_config_refuses_a_trusted_policy_without_trusted_clients_and_bad_trusted_keys(tmp_path, proxy_bundle, tokens):
    def load(**sections):
        return load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), **sections})

    with pytest.raises(ConfigError, match=r"outputs\.trusted_policy: no client is trusted"):
        load(outputs=TIERS)
    with pytest.raises(ConfigError, match=r"trusted\.token_files\.1: file .*missing.token does not exist"):
        load(server={"trusted": {"token_files": [str(tokens["trusted"]), str(tmp_path / "missing.token")]}})
    (tmp_path / "empty.token").write_text(" \n")
    with pytest.raises(ConfigError, match=r"trusted\.token_files\.0: file .* is empty"):
        load(server={"trusted": {"token_files": [str(tmp_path / "empty.token")]}})
    with pytest.raises(ConfigError, match=r"trusted\.subjects: .*server\.tls\.require_client_cert"):
        load(server={"trusted": {"subjects": ["CN=client"]}})
    cfg = load(server={"trusted": {"token_files": [str(tokens["trusted"])]}}, outputs=TIERS)
    assert cfg.server.trusted.enabled and cfg.outputs.policy == "label" and cfg.outputs.trusted_policy == "logits"


def test_trust_is_proved_never_claimed(tokens):
    trust = Trust.of(["CN=ops"], [tokens["trusted"]])
    token = tokens["trusted"].read_text().strip()
    assert trust.check(None, [("authorization", f"Bearer {token}")])
    assert trust.check(None, [("authorization", f"bearer  {token} ")])  # scheme case and spaces, as identities
    assert trust.check({"x509_subject": [b"CN=ops"]}, [])
    assert not trust.check(None, [("authorization", "Bearer nope")])
    assert not trust.check(None, [("authorization", f"Basic {token}")])
    assert not trust.check({"x509_subject": [b"CN=other"]}, [("x-client-id", "CN=ops"), ("x-client-id", token)])
    assert not trust.check(None, [])
    assert token not in repr(trust)  # only the tokens' hashes are kept
    assert not Trust().enabled and Trust.of([], [tokens["trusted"]]).enabled


def test_trusted_tokens_get_the_logits_and_the_scores_and_others_the_label_and_no_oracle(start_proxy, tokens,
                                                                                          ort_logits):
    p = start_proxy(server={"explain": True, "trusted": {"token_files": [str(tokens["trusted"]),
                                                                         str(tokens["other_trusted"])]}},
                    outputs=TIERS, pipeline=BRIGHTNESS)
    client = tc.InferenceServerClient(p.url)
    want = ort_logits(DARK)
    # anonymous, a wrong token, and a client that claims an identity in a header: the label only
    for headers in (None, {"authorization": "Bearer t-guess"}, {"x-client-id": "trusted"}):
        res = infer(client, DARK, headers)
        np.testing.assert_array_equal(res.as_numpy("logits"), onehot(want))
        assert names(res) == ["logits", "robustgate_verdict"]
        with pytest.raises(InferenceServerException) as err:
            infer(client, BRIGHT, headers)
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        assert err.value.message() == "rejected by robustgate: item 0 stage brightness"
    # each trusted token: the model's logits and the detector's score; a rejection names score and threshold
    for name in ("trusted", "other_trusted"):
        res = infer(client, DARK, bearer(tokens[name]))
        np.testing.assert_allclose(res.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)
        assert res.as_numpy("robustgate_score_brightness")[0] == pytest.approx(0.2)
        with pytest.raises(InferenceServerException) as err:
            infer(client, BRIGHT, bearer(tokens[name]))
        assert err.value.message() == "rejected by robustgate: item 0 stage brightness score 0.8 threshold 0.5"
    # the model's metadata declares to each what it is answered
    with grpc.insecure_channel(p.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        ask = pb.ModelMetadataRequest(name="tiny")
        anonymous = stub.ModelMetadata(ask, timeout=30)
        trusted = stub.ModelMetadata(ask, timeout=30, metadata=tuple(bearer(tokens["trusted"]).items()))
        with pytest.raises(grpc.RpcError) as err:  # a trusted client asking for an output others have not
            req = pb.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="input", datatype="FP32", shape=list(DARK.shape))
            req.raw_input_contents.append(DARK.tobytes())
            req.outputs.add(name="robustgate_score_brightness")
            stub.ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.ModelInfer(req, timeout=30, metadata=tuple(bearer(tokens["trusted"]).items())).outputs[0].name \
            == "robustgate_score_brightness"
    assert [o.name for o in anonymous.outputs] == ["logits", "robustgate_verdict"]
    assert [o.name for o in trusted.outputs] == ["logits", "robustgate_verdict", "robustgate_score_brightness"]


def test_with_server_auth_a_trusted_token_is_accepted_and_answered_as_trusted(start_proxy, tokens, ort_logits):
    p = start_proxy(server={"auth": {"bearer_token_file": str(tokens["auth"])},
                            "trusted": {"token_files": [str(tokens["trusted"])]}}, outputs=TIERS)
    client = tc.InferenceServerClient(p.url)
    with pytest.raises(InferenceServerException) as err:
        infer(client, DARK)
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    want = ort_logits(DARK)
    np.testing.assert_array_equal(infer(client, DARK, bearer(tokens["auth"])).as_numpy("logits"), onehot(want))
    np.testing.assert_allclose(infer(client, DARK, bearer(tokens["trusted"])).as_numpy("logits"), want,
                               rtol=1e-5, atol=1e-6)


def test_a_trusted_certificate_subject_gets_the_trusted_policy(start_proxy, pki, ort_logits):
    p = start_proxy(server={"tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
                                    "client_ca": str(pki / "ca.pem"), "require_client_cert": True},
                            "trusted": {"subjects": ["CN=client"]}},
                    outputs={"policy": "top_k", "k": 1, "decimals": 1, "trusted_policy": "logits"})
    want = ort_logits(DARK)

    def client(cert: str | None) -> tc.InferenceServerClient:
        kw = {"private_key": str(pki / f"{cert}.key"), "certificate_chain": str(pki / f"{cert}.pem")} if cert else {}
        return tc.InferenceServerClient(f"localhost:{p.port}", ssl=True, root_certificates=str(pki / "ca.pem"), **kw)

    np.testing.assert_allclose(infer(client("client"), DARK).as_numpy("logits"), want, rtol=1e-5, atol=1e-6)
    got = infer(client("other"), DARK).as_numpy("logits")  # a valid certificate, an untrusted subject
    assert np.count_nonzero(got) == 1 and got.argmax() == want.argmax()  # one rounded probability
    np.testing.assert_array_equal(got, np.round(got, 1))
