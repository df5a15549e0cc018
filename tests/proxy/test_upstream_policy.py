"""UpstreamBackend's retry policy, answer decoding, readiness and TLS against a scripted V2 gRPC
server on loopback (tests/proxy/upstream/scripted.py): what MLServer cannot be told to do."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

import scripted  # tests/proxy/upstream (pytest pythonpath)
from harness import wait_until
from robustgate.proxy.backends.base import BackendError
from robustgate.proxy.backends.upstream import UpstreamBackend




def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 4, 4), dtype=np.float32)  # [n, 1, 4, 4]


@pytest.fixture
def upstream():
    server = scripted.ScriptedUpstream().start()
    yield server
    server.stop()


def backend_for(server, **kwargs) -> UpstreamBackend:
    return UpstreamBackend(url=server.url, model_name="formula", **{"backoff_s": 0.01, **kwargs})


def test_retries_unavailable_then_succeeds(upstream):
    b = backend_for(upstream, retries=2)
    try:
        x = pixels(3)
        b.infer(x)  # metadata fetched, one clean call
        upstream.batches = []
        upstream.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
        assert upstream.calls == 3
    finally:
        b.close()


def test_retries_are_bounded(upstream):
    b = backend_for(upstream, retries=1, health_interval_s=60.0)
    try:
        b.infer(pixels(1))
        assert b.ready()
        upstream.batches = []
        upstream.script = [grpc.StatusCode.UNAVAILABLE] * 5
        with pytest.raises(BackendError, match="after 2 attempt") as err:
            b.infer(pixels(1))
        assert err.value.code == "UNAVAILABLE"
        assert upstream.calls == 2
        assert not b.ready()  # a call that found the upstream unavailable turns readiness off at once
    finally:
        b.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED])
def test_other_statuses_are_final_and_keep_their_code(upstream, code):
    b = backend_for(upstream, retries=3)
    try:
        b.infer(pixels(1))
        upstream.batches = []
        upstream.script = [code]
        with pytest.raises(BackendError, match=f"scripted {code.name}") as err:
            b.infer(pixels(2))
        assert err.value.code == code.name
        assert upstream.calls == 1
    finally:
        b.close()


def test_backoff_never_sleeps_past_the_deadline(upstream):
    b = backend_for(upstream, retries=5, backoff_s=5.0)
    try:
        b.infer(pixels(1))
        upstream.batches = []
        upstream.script = [grpc.StatusCode.UNAVAILABLE] * 10
        with pytest.raises(BackendError, match="no time to retry") as err:
            b.infer(pixels(1), timeout=0.5)
        assert err.value.code == "UNAVAILABLE"  # what went wrong; the client's deadline had not passed yet
        assert upstream.calls == 1
    finally:
        b.close()


@pytest.mark.parametrize("kwargs,n,batches", [
    ({"max_batch_items": 4}, 10, [2, 4, 4]),
    ({"max_request_bytes": 4096 + 16 * 64}, 40, [8, 16, 16]),  # [1, 4, 4] FP32 is 64 bytes; 4 KiB for the rest
    # no bound configured, and the scripted server answers ModelConfig UNIMPLEMENTED (MLServer and KServe too)
    ({}, 300, [300]),
])
def test_a_batch_goes_as_requests_within_the_bounds(upstream, kwargs, n, batches):
    b = backend_for(upstream, **kwargs)
    try:
        x = pixels(n, seed=n)
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)  # rows in the batch's order
        assert sorted(upstream.batches) == batches
        assert b.max_batch_items == kwargs.get("max_batch_items")  # nothing read from the scripted server
    finally:
        b.close()


@pytest.fixture
def triton_like():
    """The scripted upstream answering Triton's ModelConfig too (tritonclient's full messages), with
    max_batch_size 4 once its ``config_script`` of failures is spent."""
    server = scripted.ScriptedUpstream(max_batch_size=4).start()
    yield server
    server.stop()


def test_tritons_max_batch_size_is_read_and_asked_again_after_a_failure(triton_like):
    """The first ModelConfig call fails UNAVAILABLE: the batch before it goes whole, the one after the
    health interval in requests of at most 4 items."""
    server = triton_like
    server.config_script = [grpc.StatusCode.UNAVAILABLE]
    b = backend_for(server, health_interval_s=0.3)
    try:
        x = pixels(10, seed=5)
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
        assert server.batches == [10] and server.config_calls == 1 and b.max_batch_items is None
        b.infer(x)  # within the interval: not asked again
        assert server.config_calls == 1
        time.sleep(0.35)
        server.batches = []
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
        assert server.config_calls == 2 and b.max_batch_items == 4 and sorted(server.batches) == [2, 4, 4]
        b.infer(x)
        assert server.config_calls == 2  # settled
    finally:
        b.close()


def test_a_model_config_answer_that_is_not_transient_settles_no_bound(triton_like):
    """An upstream that refuses ModelConfig for good (here PERMISSION_DENIED) is not asked again."""
    server = triton_like
    server.config_script = [grpc.StatusCode.PERMISSION_DENIED]
    b = backend_for(server, health_interval_s=0.1)
    try:
        x = pixels(10, seed=6)
        b.infer(x)
        time.sleep(0.15)
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
        assert server.config_calls == 1 and b.max_batch_items is None and server.batches == [10, 10]
    finally:
        b.close()


def test_each_request_of_a_split_batch_has_its_own_retries(upstream):
    b = backend_for(upstream, max_batch_items=4, retries=1)
    try:
        b.infer(pixels(1))  # metadata fetched
        upstream.batches, upstream.script = [], [grpc.StatusCode.UNAVAILABLE]
        x = pixels(10, seed=4)
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
        # 4 + 4 + 2 items, and the one that failed sent again
        assert sorted(upstream.batches) in ([2, 2, 4, 4], [2, 4, 4, 4]), upstream.batches
        upstream.script = [grpc.StatusCode.INVALID_ARGUMENT]
        with pytest.raises(BackendError) as err:  # a final answer to one request fails the batch
            b.infer(x)
        assert err.value.code == "INVALID_ARGUMENT"
    finally:
        b.close()


def test_input_name_comes_from_the_upstreams_metadata(upstream):
    """The scripted model's input is called "pixels"; it refuses any other name."""
    b = backend_for(upstream)
    try:
        x = pixels(4, seed=3)
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
        assert b.metadata().inputs[0].name == "pixels"
        assert b.metadata().platform == "scripted"
    finally:
        b.close()


def test_typed_answers_are_decoded():
    server = scripted.ScriptedUpstream(answer="typed").start()
    b = backend_for(server)
    try:
        x = pixels(5, seed=4)
        got = b.infer(x)
        assert got.dtype == np.float32 and got.shape == (5, scripted.K)
        np.testing.assert_allclose(got, scripted.formula_logits(x), rtol=1e-6)
    finally:
        b.close()
        server.stop()


@pytest.mark.parametrize("answer,message", [("short_raw", "raw bytes"), ("wrong_k", r"shape \[2, 11\]")])
def test_malformed_answers_are_internal(answer, message):
    server = scripted.ScriptedUpstream(answer=answer).start()
    b = backend_for(server)
    try:
        with pytest.raises(BackendError, match=message) as err:
            b.infer(pixels(2))
        assert err.value.code == "INTERNAL"
    finally:
        b.close()
        server.stop()


@pytest.mark.parametrize("flag", ["server_ready", "model_ready"])
def test_readiness_follows_server_and_model_ready(upstream, flag):
    b = backend_for(upstream, health_interval_s=0.1)
    try:
        assert b.ready()
        setattr(upstream, flag, False)
        wait_until(lambda: not b.ready(), what=f"not ready after {flag}=False")
        setattr(upstream, flag, True)
        wait_until(b.ready, what=f"ready after {flag}=True")
    finally:
        b.close()
    assert not b.ready()  # a closed backend is never ready


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return scripted.make_certs(tmp_path_factory.mktemp("certs"))


def test_mutual_tls(certs):
    server = scripted.ScriptedUpstream().start(tls=(certs["server.pem"], certs["server.key"], certs["ca.pem"]))
    good = UpstreamBackend(url=server.url, model_name="formula", tls_ca=str(certs["ca.pem"]),
                           tls_cert=str(certs["client.pem"]), tls_key=str(certs["client.key"]))
    no_client_cert = UpstreamBackend(url=server.url, model_name="formula", tls_ca=str(certs["ca.pem"]),
                                     retries=0)
    plaintext = UpstreamBackend(url=server.url, model_name="formula", retries=0)
    try:
        x = pixels(2, seed=5)
        assert good.ready()
        np.testing.assert_allclose(good.infer(x), scripted.formula_logits(x), rtol=1e-6)
        for b in (no_client_cert, plaintext):
            assert not b.ready()
            with pytest.raises(BackendError) as err:
                b.infer(x)
            assert err.value.code == "UNAVAILABLE"
    finally:
        for b in (good, no_client_cert, plaintext):
            b.close()
        server.stop()


def test_server_only_tls(certs):
    server = scripted.ScriptedUpstream().start(tls=(certs["server.pem"], certs["server.key"], None))
    b = UpstreamBackend(url=server.url, model_name="formula", tls_ca=str(certs["ca.pem"]))
    try:
        x = pixels(1, seed=6)
        np.testing.assert_allclose(b.infer(x), scripted.formula_logits(x), rtol=1e-6)
    finally:
        b.close()
        server.stop()
