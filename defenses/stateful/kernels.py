"""Compiled loops of the stateful stage (numba), for the few steps whose numpy form costs more in
call overhead or in GIL releases than in arithmetic: the k-NN history scan and step
(defenses/stateful/knn_store.py) and the retry digests (defenses/stateful/blacklight.py).

numba is optional (pyproject.toml): without it :func:`compile_kernel` returns None and each caller
takes its numpy path, which computes the same values.

The kernels are not ``nogil`` (but the digests of large items): each is short, and a batch worker that
releases the GIL waits to take it back from the busy event loop (the stage's time per item in the
server: bench/results/defenses.proxy_cost.stateful.md). numpy releases it on its own for many operations
above 500 elements (a cast, ``np.dot`` of integers), hashlib for buffers of 2,048 bytes or more.
"""

from __future__ import annotations

from typing import Callable


def compile_kernel(source: Callable, signature: str, **options) -> Callable | None:
    """``source`` compiled by numba for one ``signature`` (C-contiguous arrays only, so no call
    compiles another variant) with ``options`` (e.g. ``fastmath``), now, so that no query pays the
    compilation (~0.5 s); numba's on-disk cache keeps it for the next process, or, without a
    writable cache directory (a read-only file system), it is compiled per process. None when numba
    is not installed."""
    try:
        import numba
    except ImportError:
        return None
    try:
        return numba.njit(signature, cache=True, **options)(source)
    except RuntimeError:  # no writable cache directory
        return numba.njit(signature, **options)(source)
