"""A real redis-server on a free loopback port for the tests (scripts/install.sh installs Debian's
redis-server): ``start_redis(workdir) -> (url, process)``; the caller stops the process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time


def start_redis(workdir, *extra: str) -> tuple[str, subprocess.Popen]:
    """Starts redis-server (no persistence) in ``workdir`` with ``extra`` arguments; returns its URL
    and process once it answers PING."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: scripts/install.sh installs it (apt-get install redis-server)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("redis-server did not start")
    return f"redis://127.0.0.1:{port}/0", proc


def stop_redis(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)
