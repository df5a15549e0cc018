"""glibc malloc settings for a serving process whose requests allocate large buffers.

A 3x224x224 FP32 request is 600 KB, and the proxy allocates several buffers of that size per request
(the received message, the decoded pixels, the batch, the upstream's request). glibc serves blocks
above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised dynamically as such blocks are freed) with a
fresh ``mmap`` and returns the heap's free top to the system above ``M_TRIM_THRESHOLD`` (twice the
former): with a few such buffers alive at once, the freed memory goes back to the kernel after
every request and every new buffer page-faults its pages in again, which costs more than the copy
that fills it (bench/results/byo.upstream_encode.md). :func:`keep_heap` sets both thresholds
(mallopt), so that buffers up to 32 MiB come from the heap and up to ``keep_mib`` MiB of freed heap
stay mapped for the next request: the process's resident memory may stay that much above what it
uses, the trade made by every allocator that caches (jemalloc, tcmalloc).

Written with ctypes because neither the standard library nor a maintained package exposes
``mallopt``; the same can be had with the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` at process start, which a config setting cannot provide. Process-wide
state, set once by ``robustgate serve`` in the server's own process (``server.malloc_keep_mib``);
a no-op (logged) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more


def keep_heap(keep_mib: int) -> bool:
    """Blocks up to ``min(keep_mib MiB, 32 MiB)`` from the heap, up to ``keep_mib`` MiB of free heap
    kept; ``keep_mib`` 0 leaves glibc's dynamic defaults. Returns whether the settings were applied."""
    if isinstance(keep_mib, bool) or not isinstance(keep_mib, int) or keep_mib < 0:
        raise ValueError(f"keep_mib must be an integer >= 0, got {keep_mib!r}")
    if keep_mib == 0:
        return False
    if platform.libc_ver()[0] != "glibc":
        log.info("server.malloc_keep_mib: the C library is not glibc (%s); malloc left as it is",
                 platform.libc_ver()[0] or "unknown")
        return False
    libc = ctypes.CDLL("libc.so.6")
    keep = keep_mib << 20
    ok = libc.mallopt(M_MMAP_THRESHOLD, min(keep, MMAP_THRESHOLD_MAX)) == 1 and libc.mallopt(M_TRIM_THRESHOLD, keep) == 1
    if not ok:
        log.warning("server.malloc_keep_mib: mallopt refused %d MiB; malloc left with glibc's defaults", keep_mib)
    return ok
