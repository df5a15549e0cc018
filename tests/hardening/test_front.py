"""The native front (deploy/haproxy/haproxy.cfg, a real HAProxy on loopback) in front of a real
proxy, through tritonclient.

- With the pipeline blocked, the front holds ``max_inflight`` calls open to the proxy and queues
  ``max_queue`` more; every further call is answered RESOURCE_EXHAUSTED by the front itself *while
  the pipeline is still blocked* (the proxy never sees it, the front's own metrics count it), and
  once the pipeline runs again every admitted call gets its own answer.
- The other RPCs (grpc.health.v1, the kubelet's probes; ServerReady, ModelMetadata) pass through
  unlimited: answered even while the front's queue is full.
- The proxy gone: UNAVAILABLE from the front, promptly, with the front's message.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from front import REFUSED_PREFIX, HAProxyFront, haproxy_binary  # tests/helpers (pytest pythonpath)
from harness import wait_until  # tests/proxy/upstream (pytest pythonpath)

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed (scripts/install.sh installs it)")

INFLIGHT, QUEUE = 2, 3


def call(url: str, x: np.ndarray) -> tuple[str, str, np.ndarray | None]:
    """(status, message, logits) of one ModelInfer on its own client."""
    with tc.InferenceServerClient(url) as client:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            return "OK", "", client.infer("tiny", [inp], client_timeout=120).as_numpy("logits")
        except InferenceServerException as exc:
            return str(exc.status()).removeprefix("StatusCode."), exc.message(), None


def health(url: str) -> str:
    """The grpc.health.v1 status of service "" (the readiness probe's question), through ``url``."""
    with grpc.insecure_channel(url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_the_front_refuses_beyond_its_queue_at_once_and_every_admitted_call_gets_its_answer(start_proxy, ort_logits):
    gate, entered = threading.Event(), threading.Event()
    # one item per batch: each admitted call is one pipeline run, so the gate holds them all
    p = start_proxy(
        pipeline={"stages": [{"name": "gate", "kind": "test_proxy_gate", "params": {"gate": gate, "entered": entered}}]},
        batching={"max_batch_size": 1, "workers": 1}, limits={"max_batch_items": 1},
        server={"warmup": False},  # the warm-up's batches would stop at the gate
    )
    front = HAProxyFront(p.url, max_inflight=INFLIGHT, max_queue=QUEUE)
    rng = np.random.default_rng(0)
    xs = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(16)]
    try:
        with tc.InferenceServerClient(front.url) as client:  # the other RPCs go through the front
            assert client.is_server_ready()
            assert client.get_model_metadata("tiny").name == "tiny"
        with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
            first = pool.submit(call, front.url, xs[0])
            assert entered.wait(30), "the first call never reached the pipeline"
            rest = [pool.submit(call, front.url, x) for x in xs[1:]]
            admitted = INFLIGHT + QUEUE
            done = lambda: [f for f in rest if f.done()]  # noqa: E731
            # the gate is still shut: only the front can have answered these
            wait_until(lambda: len(done()) == len(xs) - admitted and front.metrics()["queued"] == QUEUE,
                       what=f"{len(xs) - admitted} refusals by the front and a full front queue while the gate is shut")
            refused = [f.result() for f in done()]
            assert front.metrics()["inflight"] == INFLIGHT
            # the queue is full and inference refused, but probes and control calls still pass
            assert health(front.url) == "SERVING"
            with tc.InferenceServerClient(front.url) as client:
                assert client.is_server_ready() and client.is_model_ready("tiny")
            assert front.metrics()["queued"] == QUEUE and len(done()) == len(xs) - admitted
            gate.set()
            answers = [first.result(120)] + [f.result(120) for f in rest]
        counts = front.metrics()
    finally:
        gate.set()
        front.stop()

    assert Counter(s for s, _, _ in refused) == {"RESOURCE_EXHAUSTED": len(xs) - admitted}
    assert all(m.startswith(REFUSED_PREFIX) and f"{QUEUE} calls already queued" in m for _, m, _ in refused), refused[0]
    assert Counter(s for s, _, _ in answers) == {"OK": admitted, "RESOURCE_EXHAUSTED": len(xs) - admitted}
    for x, (status, _, logits) in zip(xs, answers):
        if status == "OK":
            np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)
    # the front counted each of its refusals; the proxy saw only the admitted calls
    assert counts["refused"] == len(xs) - admitted
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "accepted"}) == admitted
    assert not reg.get_sample_value("robustgate_requests_total", {"outcome": "resource_exhausted"})


def test_the_front_answers_unavailable_when_the_proxy_is_gone(start_proxy):
    p = start_proxy(pipeline={"stages": []})
    front = HAProxyFront(p.url, max_inflight=INFLIGHT, max_queue=QUEUE)
    try:
        x = np.zeros((1, 1, 28, 28), dtype=np.float32)
        assert call(front.url, x)[0] == "OK"
        p.stop()
        start = time.monotonic()
        status, message, _ = call(front.url, x)
        took = time.monotonic() - start
        assert front.proc.poll() is None, "the front must keep running"
    finally:
        front.stop()
    assert status == "UNAVAILABLE" and message.startswith(REFUSED_PREFIX) and "not reachable" in message, message
    assert took < 10, f"the front took {took:.1f} s to give up on a closed port"


def test_the_front_names_each_caller_by_its_address_whatever_header_it_sends(start_proxy):
    """Behind the front every call reaches the proxy from the front's address, so the proxy's last-resort
    identity (the peer) would make all anonymous clients one client. The front writes the caller's
    address into the identity header, over any value the client sent: two clients on one address that
    send different ``x-client-id`` values share one per-client budget through the front (each has its
    own when they call the proxy directly), and a bearer token still names its own client."""

    def status(url: str, headers: dict[str, str]) -> str:
        with tc.InferenceServerClient(url) as client:
            inp = tc.InferInput("input", [1, 1, 28, 28], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
            try:
                client.infer("tiny", [inp], headers=headers, client_timeout=60)
                return "OK"
            except InferenceServerException as exc:
                return f"{str(exc.status()).removeprefix('StatusCode.')}: {exc.message()}"

    p = start_proxy(pipeline={"stages": []}, limits={"per_client": {"budget": 2}})
    front = HAProxyFront(p.url, max_inflight=INFLIGHT, max_queue=QUEUE)
    try:
        # directly, each header names a client of its own: two budgets
        assert [status(p.url, {"x-client-id": c}) for c in ("carol", "dave", "carol", "dave")] == ["OK"] * 4
        through = [status(front.url, {"x-client-id": "alice"}), status(front.url, {"x-client-id": "alice"}),
                   status(front.url, {"x-client-id": "bob"}), status(front.url, {})]
        token = [status(front.url, {"x-client-id": "bob", "authorization": "Bearer t-1"}) for _ in range(2)]
    finally:
        front.stop()
    # through the front "alice", "bob" and the anonymous caller are one client (127.0.0.1): its budget of 2 is spent
    assert through[:2] == ["OK", "OK"], through
    assert all(s.startswith("RESOURCE_EXHAUSTED: client limit: query budget exhausted") for s in through[2:]), through
    assert token == ["OK", "OK"]
