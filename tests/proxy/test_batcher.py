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
