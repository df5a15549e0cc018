"""HAProxy as robustgate's native front (deploy/haproxy/haproxy.cfg), started as a real process on
loopback: for the tests (tests/hardening/test_front.py) and the overload benchmark
(bench/hardening/overload.py ``--front haproxy``), which load this file by path."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
REFUSED_PREFIX = "robustgate front:"  # every answer the front gives itself starts so (grpc-message)
# what .metrics() reads from HAProxy's Prometheus exporter, and all that deploy/prometheus's
# RobustgateFrontOverloaded may use (tests/deploy/test_prometheus_rules.py)
REFUSED, REQUESTS = "haproxy_frontend_intercepted_requests_total", "haproxy_frontend_http_requests_total"
QUEUED, INFLIGHT = "haproxy_backend_current_queue", "haproxy_server_current_sessions"
SERIES = frozenset({REFUSED, REQUESTS, QUEUED, INFLIGHT})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)


class HAProxyFront:
    """``HAProxyFront(upstream, max_inflight, max_queue)``: deploy/haproxy/haproxy.cfg in front of
    the robustgate gRPC port ``upstream`` (``host:port``); ``url`` is where clients connect,
    ``metrics_port`` its Prometheus exporter; ``stop()`` ends it."""

    def __init__(self, upstream: str, max_inflight: int, max_queue: int, queue_timeout: str = "250ms",
                 config: Path = CONFIG, timeout_s: float = 10.0):
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (apt-get install haproxy; scripts/install.sh does)")
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.env = {**os.environ,
                    "ROBUSTGATE_FRONT_BIND": self.url, "ROBUSTGATE_FRONT_UPSTREAM": upstream,
                    "ROBUSTGATE_FRONT_METRICS_BIND": f"127.0.0.1:{self.metrics_port}",
                    "ROBUSTGATE_FRONT_MAX_INFLIGHT": str(max_inflight), "ROBUSTGATE_FRONT_MAX_QUEUE": str(max_queue),
                    "ROBUSTGATE_FRONT_QUEUE_TIMEOUT": queue_timeout}
        self.workdir = Path(tempfile.mkdtemp(prefix="robustgate-front-"))
        self.log = self.workdir / "haproxy.log"
        # -db: stay in the foreground (no daemon), so that this object owns the process
        self.command = [binary, "-db", "-f", str(config)]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.command, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"haproxy did not listen on {self.url} in {timeout_s} s") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        """The front's own counters (its Prometheus exporter), frontend ``grpc`` and backend
        ``robustgate``: ``refused`` (answered by the front itself: requests it intercepted),
        ``requests`` (all it received), ``queued`` (waiting in its queue now), ``inflight`` (open to robustgate now)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

        def value(metric: str, labels: str) -> float:
            m = re.search(rf'^{metric}\{{{re.escape(labels)}\}} (\S+)$', text, re.M)
            if m is None:
                raise KeyError(f"{metric}{{{labels}}} not in haproxy's /metrics")
            return float(m.group(1))

        return {"refused": value(REFUSED, 'proxy="grpc"'), "requests": value(REQUESTS, 'proxy="grpc"'),
                "queued": value(QUEUED, 'proxy="robustgate"'),
                "inflight": value(INFLIGHT, 'proxy="robustgate",server="proxy"')}

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # soft stop: open calls finish
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
