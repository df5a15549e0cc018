"""Per-client rate limits and query budgets (issue 22, item 3; proxy/ratelimit.py): the limiter's
arithmetic under a controlled clock, then a real proxy on loopback with tritonclient and several
identities: refused RESOURCE_EXHAUSTED with a retry hint, other clients untouched, counters."""

from __future__ import annotations

import math
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from robustgate.proxy.config import ConfigError, load_config
from robustgate.proxy.ratelimit import ClientLimiter


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_its_rate_and_reports_the_wait():
    clock = Clock()
    lim = ClientLimiter(rate_per_s=2.0, burst=4, clock=clock)
    assert lim.check("a", 3) == (None, False)
    refusal, first = lim.check("a", 2)  # 1 token left
    assert first and refusal.reason == "rate" and refusal.retry_after_s == pytest.approx(0.5)
    refusal, first = lim.check("a", 2)
    assert refusal is not None and not first  # still refused: not a new block
    clock.t += 0.5
    assert lim.check("a", 2) == (None, False)
    assert lim.check("b", 4) == (None, False)  # another client has its own bucket
    refusal, _ = lim.check("b", 5)
    assert math.isinf(refusal.retry_after_s)  # larger than the burst: never passes


def test_budget_window_restarts():
    clock = Clock()
    lim = ClientLimiter(budget=5, window_s=60.0, clock=clock)
    assert lim.check("a", 5)[0] is None
    clock.t += 20
    refusal, first = lim.check("a", 1)
    assert first and refusal.reason == "budget" and refusal.retry_after_s == pytest.approx(40.0)
    assert "5 of 5 queries used" in refusal.message
    clock.t += 40
    assert lim.check("a", 1)[0] is None


def test_clients_are_bounded_lru():
    clock = Clock()
    lim = ClientLimiter(budget=1, max_clients=2, clock=clock)
    for c in "abc":
        assert lim.check(c)[0] is None
    assert len(lim) == 2
    assert lim.check("a")[0] is None  # "a" was forgotten (least recently seen): a fresh window


@pytest.mark.parametrize("kw", [{"rate_per_s": 0}, {"burst": 0, "rate_per_s": 1}, {"budget": 0}, {"window_s": 0}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        ClientLimiter(**kw)


def test_config_names_the_bad_key(proxy_bundle):
    with pytest.raises(ConfigError, match=r"limits\.per_client\.rate_per_s"):
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "limits": {"per_client": {"rate_per_s": -1}}})


def _metric(port: int, name: str, labels: dict) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


def _ask(url: str, x: np.ndarray, headers: dict) -> str | tuple[str, str]:
    with tc.InferenceServerClient(url) as client:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            client.infer("tiny", [inp], headers=headers, client_timeout=60)
        except InferenceServerException as exc:
            return exc.status(), exc.message()
        return "ok"


def test_rate_limit_and_budget_on_a_real_proxy(start_proxy):
    p = start_proxy(limits={"per_client": {"rate_per_s": 0.01, "burst": 3, "budget": 5}})
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    a, b = {"authorization": "Bearer token-a"}, {"x-client-id": "b"}
    assert [_ask(p.url, x, a) for _ in range(3)] == ["ok"] * 3
    status, message = _ask(p.url, x, a)
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and message.startswith("client limit: rate limit"), message
    assert _ask(p.url, x, a)[0] == "StatusCode.RESOURCE_EXHAUSTED"
    assert _ask(p.url, np.concatenate([x, x]), b) == "ok"  # another identity: its own bucket (2 queries)
    assert _ask(p.url, x, b) == "ok"
    # the retry hint travels in the trailers too
    from robustgate.protos import open_inference_grpc_pb2 as pb
    from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(p.url) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=(("authorization", "Bearer token-a"),), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.value.trailing_metadata())
    assert trailers["robustgate-verdict"] == "limited" and 0 < int(trailers["retry-after-ms"]) <= 100_000
    assert _metric(p.metrics_port, "robustgate_clients_blocked_total", {"reason": "rate"}) == 1
    assert _metric(p.metrics_port, "robustgate_queries_refused_total", {"reason": "rate"}) == 3
    assert _metric(p.metrics_port, "robustgate_requests_total", {"outcome": "limited"}) == 3
    assert _metric(p.metrics_port, "robustgate_requests_total", {"outcome": "accepted"}) == 5


def test_budget_on_a_real_proxy(start_proxy):
    p = start_proxy(limits={"per_client": {"budget": 4, "window_s": 3600}})
    x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    c = {"x-client-id": "metered"}
    assert _ask(p.url, x, c) == "ok" and _ask(p.url, x, c) == "ok"
    status, message = _ask(p.url, x[:1], c)
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "query budget exhausted: 4 of 4" in message, message
    assert _metric(p.metrics_port, "robustgate_clients_blocked_total", {"reason": "budget"}) == 1
    assert _metric(p.metrics_port, "robustgate_queries_refused_total", {"reason": "budget"}) == 1


# ---- limits.per_client.store: {kind: redis}: one state for every worker and replica -------------------
@pytest.fixture
def redis_url(redis_server):
    return redis_server[0]


def test_the_redis_limiter_applies_the_memory_rules_to_one_state_shared_by_replicas(redis_url):
    """Two RedisClientLimiter (two replicas) on one server: one client's budget and bucket are shared,
    refusals say what ClientLimiter says, 'first' marks a newly refused client once, other clients
    and prefixes are untouched, and a client's hash expires once a fresh one would be the same."""
    import asyncio

    import redis

    from robustgate.proxy.ratelimit import RedisClientLimiter

    async def run():
        a = RedisClientLimiter(redis_url, "t:b", budget=5, window_s=3600)
        b = RedisClientLimiter(redis_url, "t:b", budget=5, window_s=3600)
        other = RedisClientLimiter(redis_url, "t:other", budget=5, window_s=3600)
        mem = ClientLimiter(budget=5, window_s=3600)
        got = [await a.acheck("c", 2), await b.acheck("c", 2), await a.acheck("c", 2), await b.acheck("c", 2),
               await a.acheck("c", 1), await b.acheck("c", 1)]
        want = [mem.check("c", 2), mem.check("c", 2), mem.check("c", 2), mem.check("c", 2), mem.check("c", 1),
                mem.check("c", 1)]
        fresh = [await a.acheck("d", 5), await other.acheck("c", 5)]
        rate = RedisClientLimiter(redis_url, "t:r", rate_per_s=0.01, burst=3)
        bucket = [await rate.acheck("c", 2), await rate.acheck("c", 1), await rate.acheck("c", 1),
                  await rate.acheck("c", 4)]
        for limiter in (a, b, other, rate):
            await limiter.aclose()
        return got, want, fresh, bucket

    got, want, fresh, bucket = asyncio.run(run())
    assert [(r is None, f) for r, f in got] == [(True, False), (True, False), (False, True), (False, False),
                                                (True, False), (False, True)]
    assert [(r is None, f) for r, f in got] == [(r is None, f) for r, f in want]
    for (r, _), (w, _) in zip(got, want):
        if r is not None:
            assert r.reason == w.reason == "budget" and r.message.split("; retry")[0] == w.message.split("; retry")[0]
            assert 3590 < r.retry_after_s <= 3600
    assert fresh == [(None, False), (None, False)]
    assert bucket[0] == (None, False) and bucket[1] == (None, False)
    assert bucket[2][0].reason == "rate" and bucket[2][1] and 99 < bucket[2][0].retry_after_s <= 100
    assert bucket[2][0].message.startswith("rate limit: 0.01 queries/s, burst 3; retry after")
    assert bucket[3][0].retry_after_s == math.inf and not bucket[3][1]  # larger than the bucket: never
    r = redis.Redis.from_url(redis_url)
    assert 3_590_000 < r.pttl("t:b:c") <= 3_601_000  # the window's rest (+1 s)
    assert 290_000 < r.pttl("t:r:c") <= 301_000  # the bucket's refill: 3 tokens at 0.01/s (+1 s)
    assert int(r.hget("t:b:c", "used")) == 5


def test_two_proxies_with_limits_in_redis_share_a_clients_budget(start_proxy, redis_url, tmp_path):
    """Two real proxies (two replicas behind a Service) with ``store: {kind: redis}``: a client that
    alternates between them spends one budget; another client keeps its own. With Redis gone a call
    is refused UNAVAILABLE (on_error fail-closed, the default) or admitted (fail-open), and counted."""
    from redis_server import start_redis, stop_redis  # tests/helpers

    limits = {"per_client": {"budget": 3, "window_s": 3600, "store": {"kind": "redis", "url": redis_url}}}
    a, b = start_proxy(limits=limits), start_proxy(limits=limits)
    x = np.random.default_rng(2).random((1, 1, 28, 28), dtype=np.float32)
    c, d = {"x-client-id": "spread"}, {"x-client-id": "other"}
    assert [_ask(p.url, x, c) for p in (a, b, a)] == ["ok"] * 3
    status, message = _ask(b.url, x, c)
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "query budget exhausted: 3 of 3" in message, message
    assert _ask(b.url, x, d) == "ok"
    assert _metric(b.metrics_port, "robustgate_clients_blocked_total", {"reason": "budget"}) == 1

    (tmp_path / "gone").mkdir()
    gone_url, gone = start_redis(tmp_path / "gone")
    stop_redis(gone)  # a Redis that was there and is not any more
    closed = start_proxy(limits={"per_client": {"budget": 3, "store": {"kind": "redis", "url": gone_url,
                                                                        "timeout_ms": 200}}})
    status, message = _ask(closed.url, x, c)
    assert status == "StatusCode.UNAVAILABLE" and message == "client limits unavailable; retry later", message
    assert _metric(closed.metrics_port, "robustgate_limit_store_errors_total", {}) == 1
    opened = start_proxy(limits={"per_client": {"budget": 3, "store": {"kind": "redis", "url": gone_url,
                                                                        "timeout_ms": 200, "on_error": "fail-open"}}})
    assert _ask(opened.url, x, c) == "ok"
    assert _metric(opened.metrics_port, "robustgate_limit_store_errors_total", {}) == 1


@pytest.mark.parametrize("store, key", [({"kind": "redis"}, "url"), ({"kind": "redis", "url": "http://x"}, "url"),
                                        ({"kind": "memory", "url": "redis://x"}, "url"), ({"kind": "sql"}, "kind")])
def test_a_bad_limits_store_names_the_key(proxy_bundle, tmp_path, store, key):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"bundle": str(proxy_bundle), "limits": {"per_client": {"budget": 3, "store": store}}}))
    with pytest.raises(ConfigError, match=rf"limits\.per_client\.store\.?{key}|limits\.per_client\.store"):
        load_config(path)
