"""The batcher closes a batch early when no company is expected (a lone request does not idle for
the whole max_queue_delay), and still coalesces a stream of requests that arrive closer than the
delay while others are outstanding (proxy/batcher.py's company rule)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from robustgate.defenses.pipeline import PipelineResult
from robustgate.proxy.batcher import Batcher


def recording_run(calls, seconds: float = 0.0):
    def run(x, timeout):  # logits = each item's mean pixel; takes ``seconds`` (in the batch worker's thread)
        calls.append(x.shape[0])
        time.sleep(seconds)
        m = torch.from_numpy(x.mean(axis=(1, 2, 3)))
        return PipelineResult(logits=m[:, None], verdict=torch.zeros(len(m), dtype=torch.int64), reason=[None] * len(m))

    return run


def item(v: float) -> np.ndarray:
    return np.full((1, 1, 2, 2), v, np.float32)  # [1, 1, 2, 2]


def test_a_lone_request_does_not_wait_for_the_queue_delay():
    async def go():
        calls = []
        b = Batcher(recording_run(calls), max_batch_size=8, max_queue_delay_s=120.0, max_queue_items=16)
        b.start()
        try:  # the first request of an idle server: with the old behaviour it idled 120 s
            res, _ = await asyncio.wait_for(b.submit(item(0.25)), timeout=30)
            assert res.logits.item() == 0.25
        finally:
            await b.stop()
        assert calls == [1] and b.closed_early == 1

    asyncio.run(go())


def test_requests_further_apart_than_the_delay_run_at_once():
    async def go():
        calls = []
        b = Batcher(recording_run(calls), max_batch_size=8, max_queue_delay_s=0.05, max_queue_items=16)
        b.start()
        try:
            for v in (0.1, 0.2, 0.3, 0.4):
                res, _ = await b.submit(item(v))
                assert res.logits.item() == np.float32(v)
                await asyncio.sleep(0.3)  # gaps of >= 0.3 s: no company expected within 0.05 s
        finally:
            await b.stop()
        assert calls == [1, 1, 1, 1] and b.closed_early == 4

    asyncio.run(go())


def test_requests_closer_than_the_delay_are_still_coalesced():
    async def go():
        calls = []
        # a batch takes 20 ms: each request of the stream is still outstanding when the next arrives
        b = Batcher(recording_run(calls, 0.02), max_batch_size=8, max_queue_delay_s=2.0, max_queue_items=16)
        b.start()
        try:
            futures = []
            for i in range(8):  # a steady stream, one every ~5 ms (<< the 2 s delay)
                futures.append(asyncio.ensure_future(b.submit(item(i / 10))))
                await asyncio.sleep(0.005)
            results = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
        finally:
            await b.stop()
        assert [r.logits.item() for r, _ in results] == [np.float32(i / 10) for i in range(8)]
        return calls

    calls = asyncio.run(go())
    assert sum(calls) == 8 and max(calls) > 1, calls  # the first ran alone, the others waited for company
