"""The dynamic batcher on its own: coalescing, exact splitting, bounds, failures that do not stop it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from robustgate.defenses.pipeline import PipelineResult
from robustgate.proxy.batcher import Batcher, QueueFull


def echo_run(calls):
    """``run`` whose logits are each item's mean pixel, so every answer names its own input."""

    def run(x, timeout):
        calls.append(x.shape[0])
        if (x < 0).any():
            raise RuntimeError("poisoned batch")
        m = torch.from_numpy(x.mean(axis=(1, 2, 3)))  # [M]
        return PipelineResult(logits=m[:, None], verdict=torch.zeros(len(m), dtype=torch.int64), reason=[None] * len(m),
                              scores={"s": m * 2})

    return run


def items(values):
    return np.stack([np.full((1, 2, 2), v, np.float32) for v in values])  # [n, 1, 2, 2]


async def _coalesce(enabled):
    calls = []
    b = Batcher(echo_run(calls), enabled=enabled, max_batch_size=4, max_queue_delay_s=0.05, max_queue_items=100)
    b.start()
    try:
        reqs = [items([i / 10]) if i % 2 else items([i / 10, i / 10 + 0.01]) for i in range(6)]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        big, _ = await b.submit(items([0.5] * 6))  # larger than max_batch_size: runs alone, whole
    finally:
        await b.stop()
    for r, (res, queued) in zip(reqs, results):
        np.testing.assert_allclose(res.logits[:, 0].numpy(), r.mean(axis=(1, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(res.scores["s"].numpy(), 2 * r.mean(axis=(1, 2, 3)), rtol=1e-6)
        assert queued >= 0
    assert big.logits.shape == (6, 1) and calls[-1] == 6
    return calls[:-1]


def test_requests_are_coalesced_up_to_the_batch_size_and_split_exactly():
    calls = asyncio.run(_coalesce(True))
    assert sum(calls) == 9 and max(calls) <= 4 and len(calls) < 6


def test_disabled_batching_runs_each_request_alone():
    assert asyncio.run(_coalesce(False)) == [2, 1, 2, 1, 2, 1]


async def _closed_loops(clients, rounds):
    """``clients`` closed-loop clients, each sending its next request when its last is answered."""
    calls = []
    b = Batcher(echo_run(calls), max_batch_size=64, max_queue_delay_s=0.05, max_queue_items=100)
    b.start()

    async def client(c):
        for r in range(rounds):
            res, _ = await b.submit(items([c / 100 + r / 10000]))
            assert res.logits.shape == (1, 1)

    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
        return b.company_expected, b.closed_early, calls
    finally:
        await b.stop()


def test_a_lone_closed_loop_client_never_waits_for_company():
    # its gaps are far below the 50 ms delay, but each request waits for its own answer before the
    # next: nothing can join it, so every batch runs at once (closed early) instead of idling 50 ms
    expected, closed_early, calls = asyncio.run(_closed_loops(1, 30))
    assert not expected and closed_early >= 29 and calls == [1] * 30


def test_concurrent_clients_are_expected_to_bring_company():
    expected, _, calls = asyncio.run(_closed_loops(8, 6))
    assert expected and sum(calls) == 48 and max(calls) > 1


def test_queue_bound_and_failure_isolation():
    async def go():
        calls = []
        b = Batcher(echo_run(calls), enabled=True, max_batch_size=8, max_queue_delay_s=0.05, max_queue_items=3)
        b.start()
        try:
            with pytest.raises(QueueFull, match="limit 3"):
                await b.submit(items([0.1, 0.2, 0.3, 0.4]))  # 4 items > 3 (the server-level test fills the queue)
            with pytest.raises(RuntimeError, match="poisoned"):
                await b.submit(items([-1.0]))
            res, _ = await b.submit(items([0.7]))  # the loop survived the failed batch
            assert res.logits.item() == pytest.approx(0.7)
            assert b.depth == 0
        finally:
            await b.stop()

    asyncio.run(go())


def test_several_workers_run_batches_at_once():
    import threading

    inside, release = [], threading.Event()
    both_in = threading.Event()

    def run(x, timeout):
        inside.append(x.shape[0])
        if len(inside) == 2:
            both_in.set()
        assert release.wait(30), "never released"
        m = torch.from_numpy(x.mean(axis=(1, 2, 3)))
        return PipelineResult(logits=m[:, None], verdict=torch.zeros(len(m), dtype=torch.int64), reason=[None] * len(m))

    async def go():
        b = Batcher(run, enabled=False, workers=2, max_queue_items=10)
        b.start()
        try:
            futs = [asyncio.ensure_future(b.submit(items([v]))) for v in (0.1, 0.2, 0.3)]
            for _ in range(3000):  # until two batches are inside `run` at the same time
                if both_in.is_set():
                    break
                await asyncio.sleep(0.01)
            assert both_in.is_set()
            assert b.depth == 1  # the third waits for a free worker
            release.set()
            res = await asyncio.gather(*futs)
        finally:
            await b.stop()
        assert [r.logits.item() for r, _ in res] == pytest.approx([0.1, 0.2, 0.3])

    asyncio.run(go())


def test_a_batch_runs_until_its_most_patient_deadline():
    """A short deadline never cuts short the requests sharing its batch: ``run`` gets the time left
    until the latest deadline, and no timeout when a request has no deadline."""
    import time

    timeouts = []

    def run(x, timeout):
        timeouts.append(timeout)
        m = torch.from_numpy(x.mean(axis=(1, 2, 3)))
        return PipelineResult(logits=m[:, None], verdict=torch.zeros(len(m), dtype=torch.int64), reason=[None] * len(m))

    async def go(deadlines):
        b = Batcher(run, enabled=True, max_batch_size=8, max_queue_delay_s=0.2, max_queue_items=10)
        b.start()
        try:
            now = time.monotonic()
            res = await asyncio.gather(*(b.submit(items([v]), None if d is None else now + d)
                                         for v, d in zip((0.1, 0.2, 0.3), deadlines)))
        finally:
            await b.stop()
        assert [r.logits.item() for r, _ in res] == pytest.approx([0.1, 0.2, 0.3])

    asyncio.run(go([5.0, 60.0, 30.0]))
    assert len(timeouts) == 1 and 50.0 < timeouts[0] <= 60.0  # the latest, not the tightest (5 s)
    asyncio.run(go([5.0, None, 30.0]))
    assert len(timeouts) == 2 and timeouts[1] is None


class Clock:
    """A controllable clock: only ``advance`` moves it (the batcher's ``clock``)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def clocked_run(clock: Clock, seconds_per_item: list[float], gate, entered):
    """``run`` that takes ``seconds_per_item[0]`` per item on ``clock`` and waits for ``gate`` first."""

    def run(x, timeout):
        entered.set()
        assert gate.wait(30), "never released"
        clock.advance(seconds_per_item[0] * x.shape[0])
        m = torch.from_numpy(x.mean(axis=(1, 2, 3)))  # [M]
        return PipelineResult(logits=m[:, None], verdict=torch.zeros(len(m), dtype=torch.int64), reason=[None] * len(m))

    return run


async def _until(predicate, what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def _hold_a_batch(b: Batcher, gate, entered) -> asyncio.Future:
    """Submits a one-item request (value 0.2) whose batch blocks in ``clocked_run`` until ``gate``
    is set again; returns once that batch runs, with the request's future."""
    gate.clear()
    entered.clear()
    running = asyncio.ensure_future(b.submit(items([0.2])))
    await _until(entered.is_set, "a batch runs")
    return running


async def _refused_then_served(b: Batcher, gate, running, queued, match: str) -> None:
    """One more request is refused at once with a message matching ``match``; releasing ``gate``
    then answers the running and every queued request."""
    with pytest.raises(QueueFull, match=match):
        await asyncio.wait_for(b.submit(items([0.9])), 10)  # the bound only stops a hung test
    gate.set()
    await asyncio.gather(running, *queued)


def test_the_wait_budget_refuses_once_the_items_waiting_would_take_longer():
    """10 ms per item (on a controllable clock), budget 55 ms: with one batch running, 6 one-item
    requests queue (the 6th sees 5 waiting: 50 ms), the 7th sees 60 ms and is refused at once with
    a message naming the setting; every admitted request then gets its own answer. A slower
    service time lowers the depth at which it refuses; an empty queue always admits."""
    import threading

    clock, cost = Clock(), [0.010]
    gate, entered = threading.Event(), threading.Event()
    gate.set()

    async def go():
        b = Batcher(clocked_run(clock, cost, gate, entered), max_batch_size=1, max_queue_delay_s=0,
                    max_queue_items=100, max_queue_wait_s=0.055, clock=clock)
        b.start()
        try:
            assert b.seconds_per_item is None and b.admission(1) is None  # no estimate before a batch ran
            await b.submit(items([0.1, 0.1, 0.1, 0.1]))
            assert b.seconds_per_item == pytest.approx(0.010) and b.expected_wait_s() == 0
            running = await _hold_a_batch(b, gate, entered)
            queued = []
            for i in range(6):
                queued.append(asyncio.ensure_future(b.submit(items([0.3 + i / 100]))))
                await _until(lambda: b.depth == i + 1, f"{i + 1} waiting")
            assert b.expected_wait_s() == pytest.approx(0.060)
            with pytest.raises(QueueFull, match=r"6 items waiting would take about 60 ms at the recent 10.00 ms per item, "
                                                r"budget 55 ms \(batching.max_queue_wait_ms\)"):
                await asyncio.wait_for(b.submit(items([0.9])), 10)  # the bound only stops a hung test
            assert b.depth == 6 and not any(f.done() for f in queued)  # refused without waiting for the gate
            gate.set()
            answers = [await running] + [await f for f in queued]
            assert [r.logits.item() for r, _ in answers] == pytest.approx([0.2] + [0.3 + i / 100 for i in range(6)])
            assert b.depth == 0 and b.admission(1) is None

            cost[0] = 0.050  # the service slows down: the estimate follows, the same budget admits fewer
            for _ in range(30):
                await b.submit(items([0.5]))
            assert b.seconds_per_item == pytest.approx(0.050, rel=1e-2)
            running = await _hold_a_batch(b, gate, entered)
            queued = [asyncio.ensure_future(b.submit(items([0.3])))]
            await _until(lambda: b.depth == 1, "1 waiting")
            queued.append(asyncio.ensure_future(b.submit(items([0.3]))))  # 1 waiting: 50 ms, admitted
            await _until(lambda: b.depth == 2, "2 waiting")
            await _refused_then_served(b, gate, running, queued, "batching.max_queue_wait_ms")  # 2 waiting: 100 ms
        finally:
            gate.set()
            await b.stop()

    asyncio.run(go())


def test_without_a_wait_budget_only_the_item_bound_refuses():
    """max_queue_wait_s=None: however slow the service, requests queue up to max_queue_items."""
    import threading

    clock, cost = Clock(), [10.0]  # 10 s per item
    gate, entered = threading.Event(), threading.Event()
    gate.set()

    async def go():
        b = Batcher(clocked_run(clock, cost, gate, entered), max_batch_size=1, max_queue_delay_s=0,
                    max_queue_items=5, clock=clock)
        b.start()
        try:
            await b.submit(items([0.1]))
            running = await _hold_a_batch(b, gate, entered)
            queued = [asyncio.ensure_future(b.submit(items([0.3]))) for _ in range(5)]
            await _until(lambda: b.depth == 5, "5 waiting")
            assert b.expected_wait_s() == pytest.approx(50.0)
            await _refused_then_served(b, gate, running, queued, r"limit 5 \(batching.max_queue_items\)")
        finally:
            gate.set()
            await b.stop()

    asyncio.run(go())


def test_the_wait_budget_divides_by_the_workers_and_must_be_positive():
    b = Batcher(echo_run([]), workers=4, max_queue_wait_s=0.1)
    b._served(8, 0.08)  # one batch of 8 items in 80 ms
    b._depth = 20  # as if 20 items were waiting: 20 * 10 ms / 4 workers
    assert b.expected_wait_s() == pytest.approx(0.05) and b.admission(1) is None
    b._depth = 44
    assert "110 ms" in b.admission(1)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="max_queue_wait_s must be > 0"):
            Batcher(echo_run([]), max_queue_wait_s=bad)


def test_a_primed_service_time_keeps_a_slow_first_batch_from_refusing_a_burst():
    """The server's warm-up seeds the estimate (64 items in 6.4 ms); the first batch served after a
    start then takes 30 ms for 2 items (cold, the loop busy with the burst). Unprimed, that batch
    alone is the estimate, and 20 items waiting read as 300 ms over a 100 ms budget; primed, it
    moves the moving averages by their weight only."""
    cold, primed = Batcher(echo_run([]), max_queue_wait_s=0.1), Batcher(echo_run([]), max_queue_wait_s=0.1)
    primed.prime(64, 0.0064)
    assert primed.seconds_per_item == pytest.approx(1e-4) and cold.seconds_per_item is None
    for b in (cold, primed):
        b._served(2, 0.030)
        b._depth = 20
    assert "300 ms" in cold.admission(1)
    assert primed.admission(1) is None and primed.seconds_per_item == pytest.approx(0.01112 / 51.6)
    primed.prime(1, 1.0)  # only a batcher that has no estimate yet takes a seed
    assert primed.seconds_per_item == pytest.approx(0.01112 / 51.6)
    for items, seconds in ((0, 0.1), (1, 0.0), (1, -1.0)):
        with pytest.raises(ValueError, match="items must be >= 1 and seconds > 0"):
            cold.prime(items, seconds)


def test_the_service_time_counts_the_event_loops_share_of_a_batch_not_only_the_run():
    """The pipeline takes 10 ms per item, the event loop another 10 ms per batch (an ``on_batch``
    hook that moves the clock: a loop short of CPU): one-item batches cost 20 ms, so a 55 ms budget
    refuses at 3 waiting (60 ms), not at 6 as the run time alone would say."""
    import threading

    clock, cost = Clock(), [0.010]
    gate, entered = threading.Event(), threading.Event()
    gate.set()

    async def go():
        b = Batcher(clocked_run(clock, cost, gate, entered), max_batch_size=1, max_queue_delay_s=0,
                    max_queue_items=100, max_queue_wait_s=0.055, clock=clock,
                    on_batch=lambda n, result: clock.advance(0.010))
        b.start()
        try:
            for _ in range(3):
                await b.submit(items([0.1]))
            assert b.seconds_per_item == pytest.approx(0.020)
            running = await _hold_a_batch(b, gate, entered)
            queued = []
            for i in range(3):
                queued.append(asyncio.ensure_future(b.submit(items([0.3]))))
                await _until(lambda: b.depth == i + 1, f"{i + 1} waiting")
            with pytest.raises(QueueFull, match="3 items waiting would take about 60 ms"):
                await asyncio.wait_for(b.submit(items([0.9])), 10)
            gate.set()
            await asyncio.gather(running, *queued)
        finally:
            gate.set()
            await b.stop()

    asyncio.run(go())


def test_a_batch_with_a_front_half_is_prepared_while_the_previous_one_classifies():
    """Batch 1's finish waits until batch 2's front half has started: without the overlap this
    would never happen. At most one batch is taken from the queue beyond the one classifying."""
    import threading

    second_front, release = threading.Event(), threading.Event()
    fronts, finishes = [], []

    def front_half(x):
        fronts.append((float(x.mean()), threading.current_thread().name))
        if len(fronts) == 2:
            second_front.set()

        def finish(timeout):
            finishes.append((float(x.mean()), threading.current_thread().name))
            if len(finishes) == 1:
                assert second_front.wait(30), "the next batch's front half did not start while this one classified"
                assert release.wait(30)
            m = torch.from_numpy(x.mean(axis=(1, 2, 3)))
            return PipelineResult(logits=m[:, None], verdict=torch.zeros(len(m), dtype=torch.int64), reason=[None] * len(m))

        return finish

    async def go():
        b = Batcher(echo_run([]), enabled=False, max_queue_items=10, front=lambda: front_half)
        b.start()
        try:
            futs = [asyncio.ensure_future(b.submit(items([v]))) for v in (0.1, 0.2, 0.3)]
            for _ in range(3000):
                if second_front.is_set():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert second_front.is_set() and len(fronts) == 2  # the third batch is not taken yet
            assert b.depth == 1
            release.set()
            res = await asyncio.gather(*futs)
        finally:
            await b.stop()
        assert [r.logits.item() for r, _ in res] == pytest.approx([0.1, 0.2, 0.3])
        assert [v for v, _ in fronts] == pytest.approx([0.1, 0.2, 0.3]) == [v for v, _ in finishes]
        assert {t.split("_")[0] for _, t in fronts} == {"robustgate-front"}
        assert {t.split("_")[0] for _, t in finishes} == {"robustgate-batch"}

    asyncio.run(go())


def test_a_failing_front_half_fails_its_batch_only_and_none_runs_the_batch_whole():
    whole, finished, wanted = [], [], {"front": True}

    def front_half(x):
        if (x < 0).any():
            raise RuntimeError("front failed")
        return lambda timeout: echo_run(finished)(x, timeout)

    async def go():
        b = Batcher(echo_run(whole), enabled=False, max_queue_items=10,
                    front=lambda: front_half if wanted["front"] else None)
        b.start()
        try:
            with pytest.raises(RuntimeError, match="front failed"):
                await b.submit(items([-1.0]))
            res, _ = await b.submit(items([0.4]))  # the front thread and the worker are free again
            assert res.logits.item() == pytest.approx(0.4)
            wanted["front"] = False  # e.g. a reload removed the purifiers: the next batch runs whole
            await b.submit(items([0.5]))  # (collected under the old answer: asked again when it starts)
            res, _ = await b.submit(items([0.6]))
            assert res.logits.item() == pytest.approx(0.6)
        finally:
            await b.stop()
        assert finished == [1] and whole == [1, 1]
        assert b.seconds_per_item is not None

    asyncio.run(go())
