"""Compute threads at a lower CPU priority than the gRPC event loop (``server.compute_nice``).

On a host with few cores the event loop -- which admits, refuses and answers every call -- and the
threads that compute batches (the batcher's workers, ONNX Runtime's and torch's pools) contend for
the same cores. At equal priority a saturated proxy leaves calls waiting in gRPC core for the loop,
so even a refusal takes hundreds of milliseconds (bench/results/hardening.overload*.md). Raising the
compute threads' niceness lets the loop win a contended core at once while the compute threads
keep every cycle the loop does not need. Unprivileged processes may raise niceness, never lower it.

Linux keeps niceness per thread and a new thread inherits its creator's, so the pools an ONNX
Runtime session starts when it is built inherit the niceness of the thread that built it: that is
why sessions are built through :func:`call_at_priority`. Elsewhere (no per-thread niceness), these
calls do nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger("robustgate.proxy")

PER_THREAD = sys.platform.startswith("linux")


def lower_this_thread(nice: int) -> None:
    """Raises the calling thread's niceness by ``nice`` (0: no change; capped at 19)."""
    if nice <= 0 or not PER_THREAD:
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # a sandbox that forbids it: serve at equal priority rather than not at all
        log.warning("server.compute_nice: could not lower thread %d's priority (%s); it runs at the loop's", tid, exc)


def call_at_priority(nice: int, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run in a fresh thread ``nice`` steps below the caller; threads it
    starts (an ONNX Runtime session's pools) keep that niceness. Returns or raises what ``fn`` does."""
    if nice <= 0 or not PER_THREAD:
        return fn(*args, **kwargs)
    out: dict = {}

    def body() -> None:
        try:
            lower_this_thread(nice)
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            out["error"] = exc

    thread = threading.Thread(target=body, name="robustgate-build")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
