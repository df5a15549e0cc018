"""Dynamic batching: coalesce concurrent requests into one pipeline call, then split the answers.

The first waiting request waits at most ``max_queue_delay_s`` for company -- and only when company
is expected: when arrivals are recently closer than the delay (an exponential moving average of
the gaps) *and* an arriving request recently found, on average, at least one other request
outstanding (queued or running; a moving average of that count). Otherwise a request that finds
the queue empty runs at once instead of idling for the full delay: a lone request at low load pays
no batching latency, and neither does a lone client that sends its next request as soon as the
last is answered (its gaps are short, but nothing can join it: it waits for its own answer); under
load, arrivals are close and find others in flight, and batches fill as before. A batch closes when
the next request would take it past ``max_batch_size`` items (a request larger than that runs
alone, never split). Batches run in worker threads (the pipeline is synchronous torch/numpy;
ONNX Runtime releases the GIL), and the next batch is collected only when a worker is free, so
requests arriving meanwhile pile up into it. With ``enabled=False`` every request runs alone, in
arrival order. ``workers`` batches may run at once (the server's default: 1 for the in-process backend,
4 for an upstream one, ``BatchingConfig.resolved_workers``); a batch is collected only when a worker
is free.

Front halves (``front``, the server's ``batching.overlap_front``): for a pipeline with purifiers,
a batch is collected as soon as the *front thread* is free, not a worker; its detectors and purifiers
(the runner's ``prepare``) run there, then it waits for a worker to classify (``finish``). So one
batch's JPEG or median filter runs while the previous batch is in ONNX Runtime, on the core the
classify pass leaves idle, instead of adding to it. The front slot passes on only when the batch has
its worker, so at most one batch has left the queue beyond those running: the queue, its bound and
the admission below stay as they are. Pipelines without purifiers run whole, as before. It pays
only when classify leaves a core idle (one ONNX Runtime thread, an upstream backend): with ONNX
Runtime's two threads on two cores the front thread only contends with them, so the server ships it
off (proxy/config.py, bench/results/defenses.md).

Admission, checked when a request is submitted (:meth:`Batcher.admission`); a refused request fails
at once with :class:`QueueFull` (the server answers RESOURCE_EXHAUSTED) and never waits:

- the item bound: the queue holds at most ``max_queue_items`` items, so it never grows without limit;
- the wait budget (``max_queue_wait_s``, None = off): a request is refused when the items already
  waiting would take longer than the budget to work off -- ``depth * seconds_per_item / workers``,
  where ``seconds_per_item`` is the recent service time: the ratio of moving averages (weight
  SERVICE_EMA per batch, so full batches under load dominate) of the batches' item counts and
  cycles. A batch's cycle runs from when it could have started (its oldest request's arrival, or,
  if that request was already waiting, the moment a worker became free) to when its worker is free
  again: the pipeline run *and* the event loop's time to collect the batch, hand it to the worker
  thread and hand the answers back -- which dominates when the event loop is short of CPU. The
  queue's length is thus held in time, not items: it adapts to the pipeline's cost (a diffusion
  purifier is ~100x slower per item than MagNet) and to the CPU the process gets. Not counted: the
  batch(es) already running, so a served request's latency is about the budget plus a batch run
  plus its own batch. A request that finds the queue empty is always admitted, and so is every
  request until a first batch has run (no estimate yet). The estimate only moves when a batch ends:
  a pipeline that stalls mid-batch is bounded by the item bound and by deadlines.

Clients: a request may name its client (``submit(..., client=)``, proxy/identity.py); the batch's
``run`` / ``front`` then get ``clients=`` (one identity per item, in the batch's arrival order) for
the stateful stages; a batch in which no request named one is run without it.

Each request gets back exactly its own rows of the batch's :class:`PipelineResult`. ``clock`` (default
``time.monotonic``) times arrivals, deadlines and batches; tests pass a controllable one.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from robustgate.defenses.pipeline import PipelineResult
from robustgate.proxy.priority import lower_this_thread


log = logging.getLogger("robustgate.proxy")
GAP_EMA = 0.25  # weight of the newest inter-arrival gap in the moving average
SERVICE_EMA = 0.2  # weight of the newest batch in the moving averages of batch seconds and items


class QueueFull(Exception):
    """The batcher refuses a request: its queue holds ``max_queue_items`` items already, or the
    items waiting would take longer than ``max_queue_wait_s`` to work off."""


class DeadlineExpired(Exception):
    """The request's deadline passed before its batch could run."""


class BatcherClosed(Exception):
    """The batcher stopped before the request ran."""


@dataclass
class _Pending:
    x: np.ndarray  # [n, C, H, W]
    future: asyncio.Future
    deadline: float | None  # a value of the batcher's clock (time.monotonic()), None = no deadline
    enqueued: float
    started: float | None = None  # when its batch began to run
    client: str | None = None  # the caller's identity (proxy/identity.py), None = not named

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def slice_result(r: PipelineResult, a: int, b: int) -> PipelineResult:
    """Rows ``a:b`` of a batch result (the part that belongs to one request). The per-batch fields
    (``thresholds``, ``seconds``, ``failed_stages``) are the batch's own objects, shared by its
    requests and read only: copying them per request was per-call churn on the event loop."""
    return PipelineResult(
        logits=r.logits[a:b], verdict=r.verdict[a:b], reason=r.reason[a:b],
        scores={k: v[a:b] for k, v in r.scores.items()}, thresholds=r.thresholds,
        radius=None if r.radius is None else r.radius[a:b], seconds=r.seconds,
        failed_stages=r.failed_stages, blocked=r.blocked[a:b],
    )


class _Threads:
    """``size`` threads that run jobs from one queue, each result handed back to the event loop
    with one ``call_soon_threadsafe``: what ``loop.run_in_executor`` does, without the
    ``concurrent.futures.Future``, the work item and the chained asyncio future it makes per job
    (written here because a batch's two hand-offs were a per-batch cost on the event loop).
    Started at the first job; :meth:`shutdown` lets queued jobs finish and joins the threads."""

    def __init__(self, size: int, name: str, nice: int = 0):
        self.size, self.name, self.nice = size, name, nice
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> asyncio.Future:
        """``fn(*args)`` in one of the threads; the future settles with its result or exception."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._work, name=f"{self.name}_{i}", daemon=True)
                             for i in range(self.size)]
            for t in self._threads:
                t.start()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        lower_this_thread(self.nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, fn, args = job
            del job
            if future.cancelled():  # its batch was given up before it started (the batcher stopping)
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for this answer any more
                pass
            del loop, future, fn, args, result, error

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while the job ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """Args:
        run: ``(x [M, C, H, W] float32, timeout_s | None) -> PipelineResult``, synchronous.
        enabled: coalesce requests (False: each request alone).
        max_batch_size: items per batch; max_queue_delay_s: wait for company; max_queue_items: bound.
        max_queue_wait_s: the wait budget (module docstring, "Admission"); None = off.
        on_batch: called in the event loop after each executed batch with its item count.
        clock: seconds, monotonic (default time.monotonic; deadlines are values of it).
        thread_nice: niceness the worker threads add to their own (proxy/priority.py; 0 = none).
        front: asked before each batch is collected (module docstring, "Front halves"): the batch's
            front half, ``x -> finish(timeout) -> PipelineResult``, run in a thread of its own, or
            None to run the batch whole with ``run``. None: every batch runs whole.
        rows: ``(result, a, b) -> what submit() returns for the request holding rows a:b`` (default
            :func:`slice_result`; the server hands out ``(result, a, b)`` itself).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray, float | None], PipelineResult],
        enabled: bool = True,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue_items: int = 1024,
        on_batch: Callable[[int, PipelineResult], None] | None = None,
        workers: int = 1,
        max_queue_wait_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        thread_nice: int = 0,
        front: Callable[[], Callable[[np.ndarray], Callable[[float | None], PipelineResult]] | None] | None = None,
        rows: Callable[[Any, int, int], Any] = slice_result,
    ):
        if max_batch_size < 1 or max_queue_items < 1 or max_queue_delay_s < 0 or workers < 1:
            raise ValueError("max_batch_size, max_queue_items and workers must be >= 1 and max_queue_delay_s >= 0")
        if max_queue_wait_s is not None and not max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be > 0 or None (off), got {max_queue_wait_s}")
        self.run = run
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_items = max_queue_items
        self.max_queue_wait_s = max_queue_wait_s
        self.on_batch = on_batch
        self.clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()
        self._depth = 0  # items waiting (not yet running)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.workers = workers
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._threads = _Threads(workers, "robustgate-batch", thread_nice)
        self.front = front
        self.rows = rows
        self._front_slot: asyncio.Semaphore | None = None
        self._front_threads = None if front is None else _Threads(1, "robustgate-front", thread_nice)
        self._last_arrival: float | None = None
        self._gap_s = float("inf")  # moving average of the time between arrivals; inf = no history yet
        self._outstanding = 0  # requests submitted and not yet answered (queued or running)
        self._others = 0.0  # moving average of the requests outstanding that an arrival found
        self.closed_early = 0  # batches run before the delay ended because no company was expected
        self._batch_s: float | None = None  # moving averages of executed batches' cycle seconds and items
        self._batch_items: float | None = None
        self._freed_at: float | None = None  # when a worker last became free

    def _arrived(self, now: float) -> None:
        self._others += GAP_EMA * (self._outstanding - self._others)
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap_s = gap if self._gap_s == float("inf") else (1 - GAP_EMA) * self._gap_s + GAP_EMA * gap
        self._last_arrival = now

    @property
    def company_expected(self) -> bool:
        """Whether another request is likely within ``max_queue_delay_s``: recent arrivals were closer
        than that, and found on average at least one other request outstanding (module docstring)."""
        return self._gap_s < self.max_queue_delay_s and self._others >= 1.0

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def seconds_per_item(self) -> float | None:
        """The recent service time per item (None until a batch has run)."""
        return None if self._batch_s is None else self._batch_s / self._batch_items

    def prime(self, items: int, seconds: float) -> None:
        """Seeds the service time with a batch of ``items`` run in ``seconds`` outside the queue (the
        server's warm-up), when no batch has run yet; the batches served move it as any other. Without
        a seed the first batch sets it alone, and the first batch after a start meets cold sessions and an
        event loop busy taking in the requests that came with it: its cycle is many times the steady one,
        and the wait budget then refuses much of a burst that the pipeline would work off within it
        (bench/results/hardening.cold_burst.md)."""
        if items < 1 or not seconds > 0:
            raise ValueError(f"items must be >= 1 and seconds > 0, got {items} and {seconds}")
        if self._batch_s is None:
            self._served(items, seconds)

    def expected_wait_s(self) -> float | None:
        """Seconds the items now waiting would take to work off (None until a batch has run)."""
        t = self.seconds_per_item
        return None if t is None else self._depth * t / self.workers

    def _served(self, items: int, seconds: float) -> None:
        if self._batch_s is None:
            self._batch_s, self._batch_items = seconds, float(items)
        else:
            self._batch_s += SERVICE_EMA * (seconds - self._batch_s)
            self._batch_items += SERVICE_EMA * (items - self._batch_items)

    def admission(self, n: int) -> str | None:
        """Why a request of ``n`` items would be refused now (QueueFull's message), or None. A
        request of 1 item is the easiest to admit, so ``admission(1)`` refusing means every request
        is refused (the server checks that before decoding a request)."""
        if self._depth + n > self.max_queue_items:
            return (f"queue full: {self._depth} items waiting, this request adds {n}, limit "
                    f"{self.max_queue_items} (batching.max_queue_items); retry later")
        if self.max_queue_wait_s is not None and self._depth:
            wait = self.expected_wait_s()
            if wait is not None and wait > self.max_queue_wait_s:
                return (f"queue wait over budget: the {self._depth} items waiting would take about "
                        f"{wait * 1e3:.0f} ms at the recent {self.seconds_per_item * 1e3:.2f} ms per item, "
                        f"budget {self.max_queue_wait_s * 1e3:.0f} ms (batching.max_queue_wait_ms); retry later")
        return None

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._front_slot = asyncio.Semaphore(1)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="robustgate-batcher")

    async def stop(self) -> None:
        """Stops the loop; requests still queued fail with :class:`BatcherClosed`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the server is shutting down"))
        self._depth = 0
        self._threads.shutdown()
        if self._front_threads is not None:
            self._front_threads.shutdown()

    async def submit(self, x: np.ndarray, deadline: float | None = None,
                     client: str | None = None) -> tuple[PipelineResult, float]:
        """Queues ``x`` ``[n, C, H, W]`` of ``client``; returns its rows of the batch result and the
        seconds it waited in the queue. Raises QueueFull."""
        if self._task is None:
            raise BatcherClosed("the batcher is not running")
        n = int(x.shape[0])
        refused = self.admission(n)
        if refused is not None:
            raise QueueFull(refused)
        p = _Pending(x=x, future=asyncio.get_running_loop().create_future(), deadline=deadline, enqueued=self.clock(),
                     client=client)
        self._arrived(p.enqueued)
        self._queue.append(p)
        self._depth += n
        self._outstanding += 1
        self._wake.set()
        try:
            result = await p.future
        finally:
            self._outstanding -= 1
        return result, (p.started or p.enqueued) - p.enqueued

    def _take(self) -> _Pending | None:
        while self._queue:
            p = self._queue.popleft()
            self._depth -= p.n
            if p.future.done():  # a cancelled client's request is dropped here
                continue
            if p.deadline is not None and self.clock() >= p.deadline:
                p.future.set_exception(DeadlineExpired("the request's deadline passed while it was queued"))
                continue
            return p
        return None

    async def _collect(self) -> list[_Pending]:
        """Waits for a first request, then for company until the batch is full or the delay ends."""
        while True:
            first = self._take()
            if first is not None:
                break
            self._wake.clear()
            await self._wake.wait()
        batch, items = [first], first.n
        if not self.enabled:
            return batch
        end = first.enqueued + self.max_queue_delay_s
        while items < self.max_batch_size:
            if self._queue:
                if items + self._queue[0].n > self.max_batch_size:
                    break
                p = self._take()
                if p is not None:
                    batch.append(p)
                    items += p.n
                continue
            left = end - self.clock()
            if left <= 0:
                break
            if not self.company_expected:
                self.closed_early += 1
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=left)
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        """Waits for a free worker (or, for a batch with a front half, a free front thread),
        collects a batch for it, runs it as its own task."""
        loop = asyncio.get_running_loop()
        while True:
            fronted = self.front is not None and self.front() is not None
            if self.front is not None:
                # first the front slot, even for a batch that runs whole: a batch between its front
                # half and its worker holds it, and must get the worker before the next batch does
                await self._front_slot.acquire()
            if not fronted:
                try:
                    await self._slots.acquire()
                finally:
                    if self.front is not None:
                        self._front_slot.release()
            gate = self._front_slot if fronted else self._slots
            freed = self._freed_at
            try:
                batch = await self._collect()
            except BaseException:
                gate.release()
                raise
            task = loop.create_task(self._execute(batch, freed, fronted))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending], freed: float | None, fronted: bool = False) -> None:
        """Runs ``batch``; ``freed``: when a worker last became free before it was collected (None:
        never). ``fronted``: the batch holds the front slot, not a worker: its front half (asked
        for now, so that a reload since is seen) runs in the front thread, then -- once a worker is
        free, which frees the front slot for the next batch -- its ``finish(timeout)`` in the worker."""
        loop = asyncio.get_running_loop()
        items = sum(p.n for p in batch)
        holds_front, holds_worker = fronted, not fronted
        # its cycle began when it could have: at its oldest request's arrival, or, when that request
        # was already waiting, when a worker became free for it (for a batch with a front half: free
        # after its front, so a slow front counts too)
        since = batch[0].enqueued if freed is None else max(freed, batch[0].enqueued)
        try:
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch], axis=0)  # [M, C, H, W]
                started = self.clock()
                for p in batch:
                    p.started = started
                named = {} if all(p.client is None for p in batch) else {
                    "clients": [p.client or "peer:unknown" for p in batch for _ in range(p.n)]}  # [M], arrival order
                front = self.front() if fronted else None
                if front is None:
                    run = functools.partial(self.run, x, **named)
                else:  # finish(timeout)
                    run = await self._front_threads.run(loop, functools.partial(front, x, **named))
                if fronted:
                    await self._slots.acquire()
                    holds_worker = True
                    self._front_slot.release()
                    holds_front = False
                    if self._freed_at is not None:
                        since = max(self._freed_at, batch[0].enqueued)
                # the batch may run until its most patient request's deadline (none if one has no
                # deadline): a short deadline must not fail the requests it shares the batch with --
                # its own client gives up at its deadline and gRPC answers it DEADLINE_EXCEEDED
                deadlines = [p.deadline for p in batch]
                timeout = None if None in deadlines else max(0.0, max(deadlines) - self.clock())
                result = await self._threads.run(loop, run, timeout)
            except asyncio.CancelledError:
                _fail(batch, BatcherClosed("the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - delivered to every request of the batch; the loop goes on
                _fail(batch, exc)
                return
            if self.on_batch is not None:
                try:
                    self.on_batch(int(x.shape[0]), result)
                except Exception:  # noqa: BLE001 - metrics must never fail a request
                    log.exception("on_batch hook failed")
            a = 0
            for p in batch:
                b = a + p.n
                if not p.future.done():
                    p.future.set_result(self.rows(result, a, b))
                a = b
        finally:
            if holds_front:
                self._front_slot.release()
            if holds_worker:
                self._freed_at = self.clock()
                self._served(items, self._freed_at - since)  # a failed batch took its time too
                self._slots.release()


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)
