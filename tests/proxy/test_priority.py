"""What keeps the event loop responsive on a saturated host: compute threads at a higher niceness
than the loop (``server.compute_nice``, proxy/priority.py) and the heap frozen out of the garbage
collector's full passes (ProxyServer ``freeze_heap``)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading

import numpy as np
import pytest
import tritonclient.grpc as triton

from robustgate.proxy.priority import call_at_priority, lower_this_thread
from robustgate.proxy.serve import build_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def tasks() -> set[int]:
    """Native ids of this process's threads."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def thread_ids(proxy) -> tuple[int, int]:
    """Native ids of the proxy's batch worker (the thread that ran the batch) and event loop."""

    async def on_loop() -> int:
        return threading.get_native_id()

    async def on_worker() -> int:
        return await proxy.server.batcher._threads.run(asyncio.get_running_loop(), threading.get_native_id)

    return proxy.call(on_worker()), proxy.call(on_loop())


def infer_once(url: str) -> np.ndarray:
    client = triton.InferenceServerClient(url)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tiny", [inp]).as_numpy("logits")


def test_call_at_priority_runs_in_a_lower_thread_whose_children_inherit_it():
    base = nice_of(threading.get_native_id())
    seen = {}

    def child():
        seen["child"] = nice_of(threading.get_native_id())

    def body(x):
        seen["body"] = nice_of(threading.get_native_id())
        t = threading.Thread(target=child)
        t.start()
        t.join()
        return x * 2

    assert call_at_priority(3, body, 21) == 42
    assert seen == {"body": min(19, base + 3), "child": min(19, base + 3)}
    assert nice_of(threading.get_native_id()) == base  # the caller keeps its own
    assert call_at_priority(0, lambda: threading.current_thread()) is threading.current_thread()  # 0: inline

    with pytest.raises(KeyError, match="boom"):
        call_at_priority(2, lambda: {}["boom"])


def test_compute_threads_are_niced_and_the_event_loop_is_not(start_proxy):
    base = nice_of(threading.get_native_id())
    before = tasks()
    proxy = start_proxy(server={"compute_nice": 6})
    assert infer_once(proxy.url).shape == (2, 10)
    now = tasks()
    worker, loop = thread_ids(proxy)
    assert nice_of(worker) == base + 6
    assert nice_of(loop) == base  # the loop, which admits, refuses and answers, is not lowered
    # every thread an ONNX Runtime session started while it was built carries the niceness too
    built = build_server(proxy.cfg)
    try:
        pools = tasks() - now - before
        assert all(nice_of(t) == base + 6 for t in pools), {t: nice_of(t) for t in pools}
    finally:
        built.backend.close()


def test_compute_nice_zero_leaves_every_thread_alone(start_proxy):
    base = nice_of(threading.get_native_id())
    proxy = start_proxy(server={"compute_nice": 0})
    infer_once(proxy.url)
    worker, loop = thread_ids(proxy)
    assert nice_of(worker) == nice_of(loop) == base


def test_lower_this_thread_caps_at_19():
    seen = []

    def body():
        lower_this_thread(15)
        lower_this_thread(15)
        seen.append(nice_of(threading.get_native_id()))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [19]


def test_the_serve_process_freezes_its_heap_after_start(start_proxy):
    """``robustgate serve`` (freeze_heap=True) moves the heap alive at start out of the collector's
    reach, so that a full collection no longer pauses the event loop for ~235 ms; a test server
    (freeze_heap=False) leaves the test process's heap alone."""
    assert gc.get_freeze_count() == 0
    plain = start_proxy()
    assert gc.get_freeze_count() == 0
    plain.stop()
    proxy = start_proxy(freeze_heap=True)
    try:
        assert gc.get_freeze_count() > 50_000  # torch, ONNX Runtime, the bundle, the test process
        assert len(gc.get_objects()) < gc.get_freeze_count() / 2  # what full passes still walk is made since
        assert infer_once(proxy.url).shape == (2, 10)
    finally:
        proxy.stop()
        gc.unfreeze()  # hand the test process's heap back to the collector


def test_a_refused_priority_change_is_logged_and_the_thread_runs_on(monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError("not allowed here")

    monkeypatch.setattr(os, "setpriority", refuse)
    assert call_at_priority(5, lambda: "served") == "served"
    assert "could not lower thread" in caplog.text and "not allowed here" in caplog.text
