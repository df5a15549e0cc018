"""proxy/malloc.py: keep_heap's mallopt settings, measured by what they are for -- a loop that
allocates and frees request-sized buffers page-faults them in again every time under glibc's
defaults, and not once the heap is kept. Each case runs in its own interpreter (malloc settings are
process-wide). Also: the argument checks, and ``robustgate serve`` applying ``server.malloc_keep_mib``."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from robustgate.proxy.config import ServerConfig
from robustgate.proxy.malloc import keep_heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

FAULTS = """
import resource, sys
import numpy as np
from robustgate.proxy.malloc import keep_heap
applied = keep_heap(int(sys.argv[1]))
def round_trip():  # what a request does: a few 600 KB buffers alive at once, then freed
    a = np.ones(150_528, np.float32); b = a * 2; c = b.tobytes(); d = bytes(bytearray(c))
    return len(d)
for _ in range(20):
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    round_trip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep_mib: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, str(keep_mib)], capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied == "True", int(count)


@glibc
def test_kept_heap_stops_page_faulting_request_sized_buffers():
    default_applied, default_faults = faults(0)
    kept_applied, kept_faults = faults(128)
    assert (default_applied, kept_applied) == (False, True)
    # 200 round trips of four 600 KB buffers: ~147 pages each when they are mapped afresh
    assert default_faults > 200 * 147
    assert kept_faults < 0.02 * default_faults


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_keep_heap_refuses_what_is_not_a_size(bad):
    with pytest.raises(ValueError, match="keep_mib"):
        keep_heap(bad)


def test_the_setting_is_validated_at_the_edge():
    assert ServerConfig().malloc_keep_mib == 128
    with pytest.raises(ValueError, match="malloc_keep_mib"):
        ServerConfig(malloc_keep_mib=-1)


@pytest.mark.parametrize("own_process, keep", [(True, 64), (False, 64), (True, 0)])
def test_serve_sets_the_heap_in_its_own_process_only(monkeypatch, own_process, keep):
    from robustgate.proxy import serve
    from robustgate.proxy.config import load_config

    calls = []
    monkeypatch.setattr(serve, "keep_heap", calls.append)  # the process-wide call itself: tested above
    cfg = load_config(None, environ={}, overrides={
        "bundle": str(Path(__file__).resolve().parents[2] / "bundles" / "default"), "pipeline": {"stages": []},
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "malloc_keep_mib": keep}})
    server = serve.build_server(cfg, freeze_heap=own_process)
    server.backend.close()
    assert calls == ([keep] if own_process else [])
