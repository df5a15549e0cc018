"""Warm-up: the served pipeline run on synthetic batches before the port serves (``server.warmup``).

Two things wait for a server's first batches. Its sessions: the first run of each batch shape
allocates (ONNX Runtime's arenas, torch's caching allocator) and, on a GPU, initialises what runs
lazily (the CUDA context's modules, cuDNN's algorithm choice), which there takes seconds. And the
batcher's queue-wait admission (proxy/batcher.py): its time per item starts from the first batch
served, and the first batch after a start meets those cold sessions and an event loop busy taking
in the requests that came with it; its cycle is many times the steady one, and until the moving
average forgets it the wait budget refuses much of a burst the pipeline would work off well within
the budget. A burst of 160 calls the moment a server of the default pipeline said ready had 380 of
1,600 calls refused over 10 starts on this repository's 2-core machine (8 of the 10 bursts), 561 of
1,600 beside a process that kept one core busy; with the warm-up, none of 6,400 in 40 bursts, cold or
warm (bench/results/hardening.cold_burst.md).

So the runner is called (in a thread, at the batch workers' priority) on batches of 1 item and of
the largest batch the batcher forms, each twice -- the first call of a shape is the cold one -- and
the last call of the largest seeds the admission's time per item (``Batcher.prime``): a lower bound
of the served cycle, which leaves out the event loop's part; the batches served then move it.
Pixels are drawn uniformly in the bundle's value range from a fixed seed; no client identity goes
with them, so the stateful stages remember none of them (their encoders still run in the fused
pass), and nothing is counted in the metrics. A warm-up that fails is logged and the server serves
without it: a pipeline that fails on its batches fails on the clients' as well, and says so there.
"""

from __future__ import annotations

import time

import numpy as np

from robustgate.defenses.assemble import PipelineRunner

ROUNDS = 2  # calls per batch shape: the first is the cold one


def batch_sizes(batching_enabled: bool, max_batch_size: int) -> tuple[int, ...]:
    """The batch shapes the server will run most: single requests and, with batching, full batches."""
    return (1, max_batch_size) if batching_enabled and max_batch_size > 1 else (1,)


def warm_up(runner: PipelineRunner, item_shape: tuple[int, ...], value_range: tuple[float, float],
            sizes: tuple[int, ...], seed: int = 0) -> list[tuple[int, float]]:
    """Runs ``runner`` ``ROUNDS`` times on a batch ``[n, *item_shape]`` of each ``n`` in ``sizes``;
    returns ``(n, seconds)`` of every call, in order. Raises what the runner raises."""
    rng = np.random.default_rng(seed)
    lo, hi = value_range
    timings = []
    for n in sizes:
        x = (lo + (hi - lo) * rng.random((n, *item_shape), dtype=np.float32)).astype(np.float32)  # [n, C, H, W]
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            runner(x)  # no clients: the stateful stages observe nothing
            timings.append((n, time.perf_counter() - t0))
    return timings


def describe(timings: list[tuple[int, float]]) -> str:
    return ", ".join(f"batch {n} in {s * 1e3:.1f} ms" for n, s in timings)
