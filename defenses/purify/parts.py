"""Parts of a batch purified at once: :func:`run_parts` splits a batch's items into up to
:func:`get_threads` consecutive parts and works on them in a small pool of threads.

Why: in the proxy a batch's purifiers run between two backbone passes, in the batch worker's one
thread, while ONNX Runtime's pool waits; on a 2-core machine one core idles for the stage's whole
time. The median filter and JPEG work item by item (JPEG's mosaic decodes every image exactly as
alone) and their heavy work is C code that runs without the GIL (torch's kernels; libjpeg, with the
encode written to a file descriptor, jpeg.py), so parts computed at once give the very same values.
torch's own intra-op pool stays at one thread in the proxy (defenses/assemble.py
``pin_torch_threads``: its OpenMP barriers stall at every operator on shared cores); a part is a
coarse unit that meets the others once per stage and batch. Written here rather than with
``concurrent.futures.ThreadPoolExecutor.map`` alone because the caller's own thread computes the
first part (one hand-off fewer) and a batch too small to pay for a hand-off is not split.

Threads: :func:`set_threads` is process-wide, like ``torch.set_num_threads``; the default, 1, keeps
every part on the caller's thread (the red team, the tests, library use); ``robustgate serve`` sets
``pipeline.purify_threads``. The pool's threads are started by the first call that needs them and
keep the niceness of the thread that made it (Linux keeps niceness per thread and a new thread
inherits its creator's): in the proxy, the batch worker's ``server.compute_nice``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable

# the least work worth a part of its own, in input values: a hand-off to a pool thread costs ~0.1 ms,
# about what the median filter does with 10^5 values; a 28x28 batch of 64 (50,176 values) stays whole,
# a 3x224x224 image (150,528) is a part
MIN_PART_VALUES = 1 << 17

_threads = 1
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def set_threads(n: int) -> None:
    """Up to ``n`` parts of a batch at once (``n`` >= 1; 1 = the caller's thread only)."""
    global _threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"purify threads must be an integer >= 1, got {n!r}")
    with _lock:
        if _pool is not None and n != _threads:
            _pool.shutdown(wait=True)
            _pool = None
        _threads = n


def get_threads() -> int:
    return _threads


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=_threads - 1,
                                                          thread_name_prefix="robustgate-purify")
        return _pool


def split(n: int, values_per_item: int, threads: int) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: consecutive item ranges covering ``range(n)``, as many as ``threads`` allows
    with at least :data:`MIN_PART_VALUES` values each (one range when the batch is small), sizes
    differing by at most one item."""
    k = max(1, min(threads, n, n * values_per_item // MIN_PART_VALUES))
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_parts(n: int, values_per_item: int, body: Callable[[int, int], None]) -> None:
    """Calls ``body(a, b)`` once for each range of :func:`split` ``(n, values_per_item,
    get_threads())``, the first in the calling thread and the others at the same time in the pool;
    returns when all have returned. ``body`` writes its items' results where the caller reads them
    (each range its own rows). The first exception raised by a part is raised here, after every
    part has ended (none still writes into the caller's buffers)."""
    parts = split(n, values_per_item, _threads)
    if len(parts) == 1:
        body(*parts[0])
        return
    pool = _executor()
    futures = [pool.submit(body, a, b) for a, b in parts[1:]]
    try:
        body(*parts[0])
    finally:
        concurrent.futures.wait(futures)
    for f in futures:
        f.result()  # raises the part's exception
