"""Overload (issue 9, item 3): far more concurrent requests than the batcher's bounded queue holds,
through the real tritonclient to an in-process proxy (proxy/batcher.py: a request that would take the
queue past ``batching.max_queue_items`` fails at once with RESOURCE_EXHAUSTED).

- With the pipeline held shut (the test GatePurifier of tests/proxy/conftest.py), a flood of 64
  distinct one-image requests meets a queue of 4: exactly 4 are queued, the other 60 are answered
  RESOURCE_EXHAUSTED naming ``batching.max_queue_items`` *while the pipeline is still blocked* (so they
  never waited for capacity), the refusal counter says 60, the queue depth never exceeds 4; once the
  gate opens every queued request gets its own logits and new requests are served again.
- Sustained: 16 client threads against a slow stage (each batch sleeps) and a queue of 4 items: every
  answer is either OK with its own logits or RESOURCE_EXHAUSTED, the server's counters match the
  clients' tallies, the depth (sampled throughout, and as the robustgate_queue_depth gauge) never
  exceeds the bound, and after the load stops a concurrent burst below capacity is served in full.
- The wait budget (``batching.max_queue_wait_ms``): a stage that takes 1 s per item on the batcher's
  clock (a controllable clock, shifted by the stage itself, so nothing depends on the machine's speed)
  and a budget of 2.5 s: with one batch held shut, 3 requests queue (0, 1 and 2 s of work ahead of
  them) and the rest are refused RESOURCE_EXHAUSTED at once naming the setting -- a request for an
  unknown model too, since admission is checked before the payload is decoded; the counters say so;
  once the gate opens every admitted request gets its own logits, and the unknown model is NOT_FOUND
  again.
No wall-clock assertion: speed and latency under overload are measured by bench/hardening/overload.py.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from harness import wait_until  # tests/proxy/upstream (pytest pythonpath)
from robustgate.defenses import base as defenses_base
from robustgate.defenses.base import Purifier, register
from robustgate.proxy.config import ConfigError, load_config

QUEUE = 4  # batching.max_queue_items
REPO = Path(__file__).resolve().parents[2]


class SlowPurifier(Purifier):
    """Identity purifier that sleeps ``seconds`` per batch: a stage slower than the arrivals."""

    kind = "test_hardening_slow"

    def __init__(self, seconds: float = 0.02):
        self.seconds = seconds

    def purify(self, x, generator=None):
        time.sleep(self.seconds)
        return x


@pytest.fixture
def slow_stage():
    register(SlowPurifier)
    yield
    defenses_base._REGISTRY.pop(SlowPurifier.kind, None)  # no public unregister in the contract


class ShiftedClock:
    """``time.monotonic()`` plus an offset that only ``advance`` moves: the batcher's clock in the
    wait-budget test (the server's deadlines stay on time.monotonic and far away)."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class ClockedGatePurifier(Purifier):
    """Identity purifier that signals ``entered``, waits for ``gate``, then moves ``clock`` on by
    ``seconds_per_item`` per item: a stage of a known cost on the batcher's clock."""

    kind = "test_hardening_clocked_gate"

    def __init__(self, gate: threading.Event, entered: threading.Event, clock: ShiftedClock, seconds_per_item: float):
        self.gate, self.entered, self.clock, self.seconds_per_item = gate, entered, clock, seconds_per_item

    def purify(self, x, generator=None):
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise RuntimeError("gate never opened")
        self.clock.advance(self.seconds_per_item * x.shape[0])
        return x


@pytest.fixture
def clocked_stage():
    register(ClockedGatePurifier)
    yield
    defenses_base._REGISTRY.pop(ClockedGatePurifier.kind, None)


def infer(client: tc.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tiny", [inp], client_timeout=120).as_numpy("logits")


def attempt(url: str, x: np.ndarray, model: str = "tiny") -> tuple[str, str, np.ndarray | None]:
    """(status, message, logits) of one request on its own client."""
    with tc.InferenceServerClient(url) as client:
        try:
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return "OK", "", client.infer(model, [inp], client_timeout=120).as_numpy("logits")
        except InferenceServerException as exc:
            return str(exc.status()).removeprefix("StatusCode."), exc.message(), None


class DepthSampler:
    """Reads the batcher's depth and the robustgate_queue_depth gauge in a loop; keeps the maxima."""

    def __init__(self, proxy):
        self.batcher, self.registry = proxy.server.batcher, proxy.server.metrics.registry
        self.max_depth = self.max_gauge = 0.0
        self.samples = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            self.max_depth = max(self.max_depth, self.batcher.depth)
            if self.samples % 20 == 0:  # the gauge via a registry collect: heavier, so less often
                self.max_gauge = max(self.max_gauge, self.registry.get_sample_value("robustgate_queue_depth"))
            self.samples += 1
            time.sleep(0.0005)

    def stop(self) -> "DepthSampler":
        self._halt.set()
        self._thread.join(10)
        return self


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random((n, 1, 28, 28), dtype=np.float32)  # [n, 1, 28, 28], distinct per request


def test_a_flood_beyond_the_queue_is_refused_at_once_and_the_rest_served(start_proxy, ort_logits):
    gate, entered = threading.Event(), threading.Event()
    p = start_proxy(
        pipeline={"stages": [{"name": "gate", "kind": "test_proxy_gate", "params": {"gate": gate, "entered": entered}}]},
        batching={"max_batch_size": 2, "max_queue_items": QUEUE, "workers": 1}, limits={"max_batch_items": 2},
        server={"warmup": False},  # the warm-up's batches would stop at the gate
    )
    rng = np.random.default_rng(0)
    first = images(rng, 1)
    flood = [images(rng, 1) for _ in range(64)]
    sampler = DepthSampler(p)
    try:
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            running = pool.submit(attempt, p.url, first)
            assert entered.wait(30), "the first request never reached the pipeline"
            futures = [pool.submit(attempt, p.url, x) for x in flood]
            done = lambda: [f for f in futures if f.done()]  # noqa: E731
            # the gate is still shut: refusals that waited for capacity would never come back here
            wait_until(lambda: len(done()) == len(flood) - QUEUE and p.server.batcher.depth == QUEUE,
                       what=f"{len(flood) - QUEUE} refusals and a full queue while the gate is shut")
            refused = [f.result() for f in done()]
            assert p.server.metrics.registry.get_sample_value("robustgate_queue_depth") == QUEUE
            gate.set()
            answers = [running.result(120)] + [f.result(120) for f in futures]
    finally:
        gate.set()
        sampler.stop()

    assert Counter(s for s, _, _ in refused) == {"RESOURCE_EXHAUSTED": len(flood) - QUEUE}
    assert all("batching.max_queue_items" in m and f"limit {QUEUE}" in m for _, m, _ in refused), refused[0][1]
    by_status = Counter(s for s, _, _ in answers)
    assert by_status == {"OK": 1 + QUEUE, "RESOURCE_EXHAUSTED": len(flood) - QUEUE}
    for x, (status, _, logits) in zip([first] + flood, answers):
        if status == "OK":
            np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)
    assert sampler.samples > 0 and sampler.max_depth <= QUEUE and sampler.max_gauge <= QUEUE
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "resource_exhausted"}) == len(flood) - QUEUE
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "accepted"}) == 1 + QUEUE

    # the load dropped: new distinct requests, two at a time (within capacity), are all served
    later = [images(rng, int(rng.integers(1, 3))) for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda x: attempt(p.url, x), later))
    for x, (status, message, logits) in zip(later, results):
        assert status == "OK", message
        np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)
    assert reg.get_sample_value("robustgate_queue_depth") == 0


def test_sustained_overload_keeps_every_answer_its_own(start_proxy, ort_logits, slow_stage):
    p = start_proxy(
        pipeline={"stages": [{"name": "slow", "kind": "test_hardening_slow", "params": {"seconds": 0.02}}]},
        batching={"max_batch_size": 2, "max_queue_items": QUEUE, "max_queue_delay_ms": 1}, limits={"max_batch_items": 2},
    )
    tallies: Counter = Counter()
    mismatches, errors = [], []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with tc.InferenceServerClient(p.url) as c:
                for _ in range(25):
                    x = images(rng, int(rng.integers(1, 3)))
                    try:
                        got, status = infer(c, x), "OK"
                    except InferenceServerException as exc:
                        got, status = None, str(exc.status()).removeprefix("StatusCode.")
                        if status == "RESOURCE_EXHAUSTED" and "batching.max_queue_items" not in exc.message():
                            status = "RESOURCE_EXHAUSTED without the key"
                    with lock:
                        tallies[status] += 1
                        if got is not None and not np.allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6):
                            mismatches.append(seed)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    sampler = DepthSampler(p)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    sampler.stop()
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert set(tallies) == {"OK", "RESOURCE_EXHAUSTED"} and sum(tallies.values()) == 16 * 25, tallies
    assert not mismatches, f"{len(mismatches)} OK answers carry another request's logits"
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "resource_exhausted"}) == tallies["RESOURCE_EXHAUSTED"]
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "accepted"}) == tallies["OK"]
    assert 0 < sampler.max_depth <= QUEUE and sampler.max_gauge <= QUEUE, (sampler.max_depth, sampler.max_gauge)

    # recovery: a burst as large as the queue plus one running batch is served in full
    rng = np.random.default_rng(99)
    burst = [images(rng, 1) for _ in range(QUEUE)]
    with concurrent.futures.ThreadPoolExecutor(len(burst)) as pool:
        results = list(pool.map(lambda x: attempt(p.url, x), burst))
    for x, (status, message, logits) in zip(burst, results):
        assert status == "OK", message
        np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)


def test_the_wait_budget_refuses_at_once_what_would_wait_too_long(start_proxy, ort_logits, clocked_stage):
    gate, entered, clock = threading.Event(), threading.Event(), ShiftedClock()
    gate.set()
    p = start_proxy(
        pipeline={"stages": [{"name": "clocked", "kind": "test_hardening_clocked_gate",
                              "params": {"gate": gate, "entered": entered, "clock": clock, "seconds_per_item": 1.0}}]},
        batching={"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_items": 64, "max_queue_wait_ms": 2500,
                  "workers": 1},
        limits={"max_batch_items": 2},
        server={"warmup": False},  # the admission's estimate comes from the clocked batches alone
    )
    p.server.batcher.clock = clock  # before the first request: arrivals, batches and the estimate on it
    reg = p.server.metrics.registry
    rng = np.random.default_rng(7)
    warm, first = images(rng, 1), images(rng, 1)
    flood = [images(rng, 1) for _ in range(8)]
    status, message, _ = attempt(p.url, warm)  # one batch of 1 item: 1 s per item (plus the real few ms)
    assert status == "OK", message
    assert 1.0 <= p.server.batcher.seconds_per_item < 1.2
    gate.clear()
    entered.clear()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(flood) + 1) as pool:
            running = pool.submit(attempt, p.url, first)
            assert entered.wait(30), "the first request never reached the pipeline"
            futures = [pool.submit(attempt, p.url, x) for x in flood]
            done = lambda: [f for f in futures if f.done()]  # noqa: E731
            # 0, 1 and 2 s of work ahead: admitted; 3 s > 2.5 s: refused -- while the gate is still shut
            wait_until(lambda: len(done()) == len(flood) - 3 and p.server.batcher.depth == 3,
                       what="5 refusals and 3 queued while the gate is shut")
            refused = [f.result() for f in done()]
            unknown = attempt(p.url, warm, model="nope")  # refused before its payload is even looked at
            gate.set()
            answers = [running.result(120)] + [f.result(120) for f in futures]
    finally:
        gate.set()

    assert Counter(s for s, _, _ in refused) == {"RESOURCE_EXHAUSTED": 5}
    for _, m, _ in refused + [unknown]:
        assert "batching.max_queue_wait_ms" in m and "budget 2500 ms" in m and "3 items waiting" in m, m
    assert unknown[0] == "RESOURCE_EXHAUSTED"
    assert Counter(s for s, _, _ in answers) == {"OK": 4, "RESOURCE_EXHAUSTED": 5}
    for x, (status, _, logits) in zip([first] + flood, answers):
        if status == "OK":
            np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "resource_exhausted"}) == 6
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "accepted"}) == 1 + 4
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "not_found"}) == 0

    # the queue drained: an empty queue admits whatever the estimate, and decoding is back
    assert p.server.batcher.depth == 0
    assert attempt(p.url, warm, model="nope")[0] == "NOT_FOUND"
    later = [images(rng, int(rng.integers(1, 3))) for _ in range(3)]
    for x in later:
        status, message, logits = attempt(p.url, x)
        assert status == "OK", message
        np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "accepted"}) == 1 + 4 + 3


def config(bundle, environ: dict | None = None, **sections):
    return load_config(None, environ=environ or {}, overrides={"bundle": str(bundle), **sections})


@pytest.mark.parametrize("value, error", [
    (0, "greater than 0"), (-5, "greater than 0"), ("soon", "valid number"),
])
def test_a_bad_wait_budget_is_refused_naming_the_key(proxy_bundle, value, error):
    with pytest.raises(ConfigError, match=rf"batching\.max_queue_wait_ms: .*{error}"):
        config(proxy_bundle, batching={"max_queue_wait_ms": value})
    with pytest.raises(ConfigError, match=rf"batching\.max_queue_wait_ms: .*{error}.*ROBUSTGATE_BATCHING__MAX_QUEUE_WAIT_MS"):
        config(proxy_bundle, environ={"ROBUSTGATE_BATCHING__MAX_QUEUE_WAIT_MS": str(value)})


def test_the_wait_budget_is_off_by_default_on_in_the_shipped_config_and_set_from_the_environment(proxy_bundle):
    assert config(proxy_bundle).batching.max_queue_wait_ms is None
    assert config(proxy_bundle, environ={"ROBUSTGATE_BATCHING__MAX_QUEUE_WAIT_MS": "80"}).batching.max_queue_wait_ms == 80.0
    shipped = REPO / "deploy" / "default.yaml"
    assert load_config(shipped, environ={}).batching.max_queue_wait_ms == 100.0
    off = load_config(shipped, environ={"ROBUSTGATE_BATCHING__MAX_QUEUE_WAIT_MS": "null"})  # environment over the file
    assert off.batching.max_queue_wait_ms is None
