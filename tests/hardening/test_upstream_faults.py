"""Upstream faults under a concurrent stream of distinct requests (issue 9, item 2): the real
tritonclient -> an in-process robustgate proxy (backend.kind=upstream, batching on, so requests share
upstream calls) -> a real Seldon MLServer (tests/proxy/upstream/harness.py), or, for scripted error
statuses MLServer cannot be told to produce, the scripted V2 server of tests/proxy/upstream/scripted.py.

Several client threads each send a stream of requests with their own random images (1-3 items) and
record every answer. For every fault: every request is answered (the proxy's request counter equals
the number of answers), only the fault's documented statuses appear, and every OK answer carries the
logits of *its own* images -- ONNX Runtime on the bundle for MLServer, the scripted formula (each row
encodes its item's mean) for the scripted server -- so an answer handed to the wrong request fails.

tests/proxy/ covers each fault with one request at a time (test_upstream_proxy.py: stopped and
restarted, client deadline; test_upstream_backend.py: malformed answers, concurrent callers of the
backend with a healthy upstream); this file adds the concurrent stream through the whole proxy.

With ``server.workers: 2`` (issue 25; the last section): the killed and the stuck upstream again, against
a real ``robustgate serve`` replica of two worker processes (tests/helpers/replica.py), each client on a
connection of its own so that both workers serve; both workers must take part and the supervisor's
merged metrics count every request exactly once. (Overload and drain with two workers:
tests/proxy/test_workers.py.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import harness  # tests/proxy/upstream (pytest pythonpath)
import scripted
from harness import wait_until
from replica import WORKERS, Replica  # tests/helpers
from scrape import scrape  # tests/helpers
from robustgate.models.bundle import SCHEMA_VERSION, BackboneSpec, Bundle, BundleSpec, InputSpec, artifact

STUCK_S = 5.0  # an upstream far slower than the proxy's timeout_s below
SLOW_S = 0.2  # an upstream slow enough that concurrent requests pile up into shared batches


@dataclass
class Answer:
    x: np.ndarray  # [n, C, H, W] the request's images
    sent: float  # time.monotonic() before the call
    done: float  # time.monotonic() after the answer
    status: str  # "OK" or the gRPC status name
    message: str
    logits: np.ndarray | None  # [n, K] when OK


class Stream:
    """``threads`` tritonclient clients, each sending requests with fresh random images back to back
    (client deadline ``timeout_s``) until :meth:`stop`; every answer is kept."""

    def __init__(self, url: str, model: str, item_shape: tuple[int, int, int], threads: int = 6,
                 timeout_s: float = 60.0, channel_args: list | None = None):
        self.url, self.model, self.item_shape, self.timeout_s = url, model, item_shape, timeout_s
        self.channel_args = channel_args  # e.g. a connection per client, to reach every worker process
        self.answers: list[Answer] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> "Stream":
        for t in self._threads:
            t.start()
        return self

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(1000 + seed)
        try:
            with tc.InferenceServerClient(self.url, channel_args=self.channel_args) as client:
                while not self._stop.is_set():
                    x = rng.random((int(rng.integers(1, 4)), *self.item_shape), dtype=np.float32)
                    inp = tc.InferInput("input", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    sent = time.monotonic()
                    try:
                        result = client.infer(self.model, [inp], client_timeout=self.timeout_s)
                        status, message, logits = "OK", "", result.as_numpy("logits")
                    except InferenceServerException as exc:
                        status, message, logits = str(exc.status()).removeprefix("StatusCode."), exc.message(), None
                    with self._lock:
                        self.answers.append(Answer(x, sent, time.monotonic(), status, message, logits))
        except BaseException as exc:  # re-raised by stop() in the test's thread
            self.errors.append(exc)

    def count(self, predicate) -> int:
        with self._lock:
            return sum(1 for a in self.answers if predicate(a))

    def wait_for(self, predicate, n: int, what: str, timeout_s: float = 60.0) -> None:
        wait_until(lambda: self.count(predicate) >= n or bool(self.errors), timeout_s=timeout_s, what=what)
        if self.errors:
            raise self.errors[0]

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 10)
            assert not t.is_alive(), "a client thread hung"
        if self.errors:
            raise self.errors[0]
        return list(self.answers)


def assert_outage_then_served(answers, killed: float, restarting: float, ready: float, ort_logits) -> Counter:
    """An upstream killed at ``killed``, restarting from ``restarting``, ready again at ``ready``:
    only OK / UNAVAILABLE (the latter naming the upstream); every request sent after the kill and
    answered before the restart began failed (the upstream was dead throughout); every request sent
    once readiness was back was served, with its own logits. Returns the status counts."""
    statuses = Counter(a.status for a in answers)
    assert set(statuses) == {"OK", "UNAVAILABLE"}, statuses
    assert all(a.message.startswith("backend: upstream") for a in answers if a.status == "UNAVAILABLE")
    outage = [a for a in answers if a.sent > killed and a.done < restarting]
    assert outage and all(a.status == "UNAVAILABLE" for a in outage), Counter(a.status for a in outage)
    after = [a for a in answers if a.sent > ready]
    assert after and all(a.status == "OK" for a in after), Counter(a.status for a in after)
    assert assert_own_answers(answers, ort_logits) >= 60
    return statuses


def assert_own_answers(answers: list[Answer], reference) -> int:
    """Every OK answer equals ``reference(x)`` of its own request; returns how many were OK."""
    ok = [a for a in answers if a.status == "OK"]
    wrong = [a for a in ok if a.logits.shape != (len(a.x), 10)
             or not np.allclose(a.logits, reference(a.x), rtol=1e-5, atol=1e-6)]
    assert not wrong, f"{len(wrong)} of {len(ok)} OK answers carry logits that are not their own request's"
    return len(ok)


def assert_every_request_counted(proxy, answers: list[Answer]) -> dict[str, float]:
    reg = proxy.server.metrics.registry
    by_outcome = {o: reg.get_sample_value("robustgate_requests_total", {"outcome": o}) for o in
                  ("accepted", "upstream_error", "deadline_exceeded", "resource_exhausted", "internal", "invalid")}
    assert sum(by_outcome.values()) == len(answers), (by_outcome, len(answers))
    assert by_outcome["internal"] == 0 and by_outcome["invalid"] == 0, by_outcome
    return by_outcome


def upstream_section(url: str, model_name: str, **extra) -> dict:
    return {"kind": "upstream", "upstream": {"url": url, "model_name": model_name, "retries": 1, "backoff_s": 0.01,
                                             "health_interval_s": 0.2, **extra}}


def health(url: str) -> int:
    with grpc.insecure_channel(url) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory, proxy_bundle):
    onnx_file = proxy_bundle / "backbone.onnx"
    models = {"slow": {"onnx": onnx_file, "sleep_s": SLOW_S}, "stuck": {"onnx": onnx_file, "sleep_s": STUCK_S},
              "drop_row": {"onnx": onnx_file, "fault": "drop_row"}}
    with harness.MLServerProcess(tmp_path_factory.mktemp("mlserver_faults"), models) as server:
        yield server


# ---- killed ----------------------------------------------------------------------------------------
def test_upstream_killed_mid_stream_then_restarted(start_proxy, tmp_path, proxy_bundle, ort_logits):
    server = harness.MLServerProcess(tmp_path / "mlserver", {"tiny": {"onnx": proxy_bundle / "backbone.onnx"}})
    server.start()
    try:
        proxy = start_proxy(backend=upstream_section(server.url, "tiny"), batching={"max_batch_size": 8})
        probe = tc.InferenceServerClient(proxy.url)
        stream = Stream(proxy.url, "tiny", (1, 28, 28)).start()
        stream.wait_for(lambda a: a.status == "OK", 30, "answers with the upstream up")

        proc, server.proc = server.proc, None
        os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a drain: MLServer runs in its own session
        proc.wait(10)
        harness.wait_port_closed(server.grpc_port)
        killed = time.monotonic()
        stream.wait_for(lambda a: a.sent > killed and a.status != "OK", 20, "answers with the upstream dead")
        wait_until(lambda: not probe.is_server_ready(), what="ServerReady false with the upstream dead")
        wait_until(lambda: health(proxy.url) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   what="grpc.health.v1 NOT_SERVING with the upstream dead")
        assert not probe.is_model_ready("tiny") and probe.is_server_live()

        restarting = time.monotonic()
        server.start()  # the same gRPC port
        wait_until(probe.is_server_ready, what="ServerReady true once the upstream is back")
        ready = time.monotonic()
        stream.wait_for(lambda a: a.sent > ready and a.status == "OK", 30, "answers after the restart")
        wait_until(lambda: health(proxy.url) == health_pb2.HealthCheckResponse.SERVING,
                   what="grpc.health.v1 SERVING once the upstream is back")
        answers = stream.stop()
    finally:
        server.stop()

    statuses = assert_outage_then_served(answers, killed, restarting, ready, ort_logits)
    outcomes = assert_every_request_counted(proxy, answers)
    assert outcomes["upstream_error"] == statuses["UNAVAILABLE"]


# ---- slow --------------------------------------------------------------------------------------------
def test_slow_upstream_shared_batches_give_each_request_its_own_rows(start_proxy, mlserver, ort_logits):
    """Each upstream call sleeps SLOW_S: concurrent requests pile up into shared batches (max 8 items,
    4 upstream calls in flight) whose answer rows must be split back to the right requests."""
    proxy = start_proxy(backend=upstream_section(mlserver.url, "slow"), model_name="slow",
                        batching={"max_batch_size": 8, "workers": 4})
    stream = Stream(proxy.url, "slow", (1, 28, 28), threads=8).start()
    stream.wait_for(lambda a: a.status == "OK", 60, "answers from the slow upstream", timeout_s=120)
    answers = stream.stop()
    assert Counter(a.status for a in answers) == {"OK": len(answers)}
    assert_own_answers(answers, ort_logits)
    outcomes = assert_every_request_counted(proxy, answers)
    batches = proxy.server.metrics.registry.get_sample_value("robustgate_batch_size_count")
    assert outcomes["accepted"] > batches, "no batch held two requests: the split was not exercised"


def test_upstream_slower_than_the_timeout_answers_deadline_exceeded(start_proxy, mlserver):
    """The upstream takes STUCK_S; backend.upstream.timeout_s is 0.5 s and the clients allow 60 s: every
    request is answered DEADLINE_EXCEEDED by the proxy itself (the message says so), none hangs."""
    proxy = start_proxy(backend=upstream_section(mlserver.url, "stuck", timeout_s=0.5), model_name="stuck",
                        batching={"max_batch_size": 8, "workers": 4})
    stream = Stream(proxy.url, "stuck", (1, 28, 28), threads=6, timeout_s=60.0).start()
    stream.wait_for(lambda a: True, 18, "answers from the stuck upstream")
    with tc.InferenceServerClient(proxy.url) as probe:
        assert probe.is_server_live() and probe.get_model_metadata("stuck").name == "stuck"  # not blocked by it
    answers = stream.stop()
    assert Counter(a.status for a in answers) == {"DEADLINE_EXCEEDED": len(answers)}
    assert all(a.message.startswith("backend: upstream") and "deadline" in a.message for a in answers), answers[0].message
    outcomes = assert_every_request_counted(proxy, answers)
    assert outcomes["deadline_exceeded"] == len(answers)


# ---- malformed ---------------------------------------------------------------------------------------
def test_malformed_upstream_answers_are_internal_for_every_request(start_proxy, mlserver):
    """MLServer answers one row fewer than it was sent: never passed on (rows would shift between the
    requests of a batch); every request of every batch is answered INTERNAL naming the shape."""
    proxy = start_proxy(backend=upstream_section(mlserver.url, "drop_row"), model_name="drop_row",
                        batching={"max_batch_size": 8})
    stream = Stream(proxy.url, "drop_row", (1, 28, 28)).start()
    stream.wait_for(lambda a: True, 30, "answers from the malformed upstream")
    answers = stream.stop()
    assert Counter(a.status for a in answers) == {"INTERNAL": len(answers)}
    assert all("has shape" in a.message and "expected" in a.message for a in answers), answers[0].message
    assert_every_request_counted(proxy, answers)
    reg = proxy.server.metrics.registry
    assert reg.get_sample_value("robustgate_upstream_errors_total", {"code": "INTERNAL"}) >= 1
    with tc.InferenceServerClient(proxy.url) as probe:
        assert probe.is_server_ready()  # the upstream answers; it is its answers that are wrong


# ---- erroring ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def formula_bundle(tmp_path_factory) -> Path:
    """A bundle for the scripted upstream's model ("formula": [N, 1, 4, 4] -> [N, 10]). The backbone
    file only satisfies the manifest: with an upstream backend and no stages it is never run here."""
    root = tmp_path_factory.mktemp("formula") / "formula"
    harness.make_tiny_onnx(root / "backbone.onnx")
    spec = BundleSpec(
        schema_version=SCHEMA_VERSION, name="formula", input=InputSpec(shape=(1, 4, 4)),
        classes=[f"c{k}" for k in range(scripted.K)],
        backbone=BackboneSpec(onnx=artifact(root, "backbone.onnx"), arch="scripted-formula"),
    )
    Bundle(root, spec).save()
    return root


def test_erroring_upstream_interleaved_with_answers(start_proxy, formula_bundle):
    """The scripted upstream fails some calls (INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE) between successful
    ones: each failure reaches exactly the requests of its batch with the upstream's code, and every OK
    answer is its own request's (row i = mean of item i + k). UNAVAILABLE is retried once: a run of 5
    (more than the 4 upstream calls in flight) makes at least one call fail twice."""
    upstream = scripted.ScriptedUpstream().start()
    c = grpc.StatusCode
    pattern = [None, None, c.INTERNAL, None, c.RESOURCE_EXHAUSTED, None, None] + [c.UNAVAILABLE] * 5 + [None]
    upstream.script = pattern * 300
    try:
        proxy = start_proxy(bundle=formula_bundle, backend=upstream_section(upstream.url, "formula"),
                            batching={"max_batch_size": 8, "workers": 4})
        stream = Stream(proxy.url, "formula", (1, 4, 4)).start()
        wait_until(lambda: upstream.calls >= 10 * len(pattern) or bool(stream.errors), what="upstream calls")
        answers = stream.stop()
    finally:
        upstream.stop()
    statuses = Counter(a.status for a in answers)
    assert set(statuses) == {"OK", "INTERNAL", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, statuses
    for a in answers:
        if a.status != "OK":
            assert a.message.startswith("backend: upstream") and f"scripted {a.status}" in a.message, a.message
    assert_own_answers(answers, scripted.formula_logits)
    outcomes = assert_every_request_counted(proxy, answers)
    assert outcomes["upstream_error"] == len(answers) - statuses["OK"]


# ---- two worker processes ----------------------------------------------------------------------------
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # SO_REUSEPORT spreads connections, not calls
OUTCOMES = ("accepted", "upstream_error", "deadline_exceeded", "resource_exhausted", "internal", "invalid",
            "unavailable")


def merged_outcomes(r: Replica) -> dict[str, float]:
    got = scrape(r.metrics_port).get("robustgate_requests_total", {})
    return {o: got.get(frozenset({("outcome", o)}), 0.0) for o in OUTCOMES}


def assert_counted_once(r: Replica, answers) -> dict[str, float]:
    """The merged counters equal the answers (the workers refresh nothing for counters: read at once),
    and each worker answered some."""
    outcomes = merged_outcomes(r)
    assert sum(outcomes.values()) == len(answers), (outcomes, len(answers))
    assert outcomes["internal"] == 0 and outcomes["invalid"] == 0, outcomes
    per_worker = Counter()
    for o in OUTCOMES:
        for pid, v in r.per_worker("robustgate_requests_total", {"outcome": o}).items():
            per_worker[pid] += v
    assert len([v for v in per_worker.values() if v > 0]) == WORKERS, per_worker
    return outcomes


def test_upstream_killed_mid_stream_then_restarted_with_two_workers(tmp_path, proxy_bundle, ort_logits):
    server = harness.MLServerProcess(tmp_path / "mlserver", {"tiny": {"onnx": proxy_bundle / "backbone.onnx"}})
    server.start()
    r = None
    try:
        r = Replica(tmp_path, proxy_bundle, stages=[], backend=upstream_section(server.url, "tiny"),
                    batching={"max_batch_size": 8})
        probe = tc.InferenceServerClient(r.url)
        stream = Stream(r.url, "tiny", (1, 28, 28), threads=16, channel_args=OWN_CONNECTION).start()
        stream.wait_for(lambda a: a.status == "OK", 30, "answers with the upstream up")

        proc, server.proc = server.proc, None
        os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a drain
        proc.wait(10)
        harness.wait_port_closed(server.grpc_port)
        killed = time.monotonic()
        stream.wait_for(lambda a: a.sent > killed and a.status != "OK", 20, "answers with the upstream dead")
        wait_until(lambda: not probe.is_server_ready(), what="ServerReady false with the upstream dead")

        restarting = time.monotonic()
        server.start()  # the same gRPC port
        wait_until(probe.is_server_ready, what="ServerReady true once the upstream is back")
        time.sleep(1.5)  # each worker polls its own upstream health (health_interval_s 0.2): both see it back
        ready = time.monotonic()
        stream.wait_for(lambda a: a.sent > ready and a.status == "OK", 30, "answers after the restart")
        answers = stream.stop()
        statuses = assert_outage_then_served(answers, killed, restarting, ready, ort_logits)
        outcomes = assert_counted_once(r, answers)
        assert outcomes["upstream_error"] == statuses["UNAVAILABLE"]
        code, _ = r.stop()
        assert code == 0
    finally:
        if r is not None:
            r.kill()
        server.stop()


def test_upstream_slower_than_the_timeout_with_two_workers(tmp_path, proxy_bundle):
    models = {"stuck": {"onnx": proxy_bundle / "backbone.onnx", "sleep_s": STUCK_S}}
    with harness.MLServerProcess(tmp_path / "mlserver", models) as server:
        r = Replica(tmp_path, proxy_bundle, stages=[], model_name="stuck",
                    backend=upstream_section(server.url, "stuck", timeout_s=0.5),
                    batching={"max_batch_size": 8, "workers": 4})
        try:
            stream = Stream(r.url, "stuck", (1, 28, 28), threads=16, channel_args=OWN_CONNECTION).start()  # 16 connections: all on one worker with probability 2^-15
            stream.wait_for(lambda a: True, 24, "answers from the stuck upstream")
            answers = stream.stop()
            assert Counter(a.status for a in answers) == {"DEADLINE_EXCEEDED": len(answers)}
            assert all(a.message.startswith("backend: upstream") and a.done - a.sent < STUCK_S for a in answers)
            outcomes = assert_counted_once(r, answers)
            assert outcomes["deadline_exceeded"] == len(answers)
            code, _ = r.stop()
            assert code == 0
        finally:
            r.kill()
