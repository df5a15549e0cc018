"""Shared helpers of the hardening benchmarks: a real ``robustgate serve`` subprocess on loopback,
its resident memory, the machine's load, Fashion-MNIST test images and result files.

bench/ is not a package: the scripts put this folder on ``sys.path`` and ``import common``.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
_SERVING = re.compile(r"robustgate: serving (\S+) on port (\d+), metrics on port (\S+)")

sys.path.insert(0, str(REPO / "bench" / "serving"))
from loadgen import make_request, process_cpu_s  # noqa: E402,F401  (one /proc reader, one request builder)


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "robustgate_revision": rev or "unknown"}


def test_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` Fashion-MNIST test images ``[n, 1, 28, 28]`` float32 in [0, 1] and their labels, drawn
    with ``seed`` from the original IDX files (no torchvision folder layout needed)."""
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return images[idx].astype(np.float32) / np.float32(255.0), labels[idx].astype(np.int64)


def infer_request(model: str, x: np.ndarray, input_name: str = "input") -> pb.ModelInferRequest:
    return make_request(model, input_name, x)


def logits_of(resp: pb.ModelInferResponse, name: str = "logits") -> np.ndarray:
    i = [o.name for o in resp.outputs].index(name)
    return np.frombuffer(resp.raw_output_contents[i], "<f4").reshape(tuple(resp.outputs[i].shape))


def served_answers(config: dict, logits: np.ndarray) -> np.ndarray:
    """What a served ``config`` answers an anonymous client for reference ``logits`` ``[N, K]``: its
    output policy applied (deploy/default.yaml's ``label``: the argmax one-hot), as the proxy does."""
    from robustgate.proxy.config import OutputsConfig
    from robustgate.proxy.verdicts import apply_outputs

    return apply_outputs(np.asarray(logits, dtype=np.float32), OutputsConfig(**(config.get("outputs") or {})))


def robustgate_command() -> list[str]:
    """The installed ``robustgate`` script beside this Python, else the package run as a module (a
    machine where the repository is only on PYTHONPATH, as bench/gpu/check.sh runs it)."""
    script = Path(sys.executable).with_name("robustgate")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "robustgate.proxy.cli"]


class Serve:
    """``robustgate serve --config`` as a subprocess on 127.0.0.1 free ports (``--port 0``).

    ``config``: a YAML file to start from (relative paths in it are taken from the repository root,
    where the process runs); ``overrides``: nested sections merged over it; ``nice``: niceness
    added to the server process."""

    def __init__(self, config: Path | None = None, overrides: dict | None = None, nice: int = 0,
                 workdir: Path | None = None, log_level: str = "WARNING", timeout_s: float = 180.0):
        cfg = yaml.safe_load(Path(config).read_text()) if config else {}
        for key, value in (overrides or {}).items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        server = cfg.setdefault("server", {})
        server.update(host="127.0.0.1", metrics_host="127.0.0.1")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="robustgate-hardening-"))
        self.config_path = self.workdir / "proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.config = cfg
        self.log = self.workdir / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTGATE_")}
        cmd = [*robustgate_command(), "serve", "--config", str(self.config_path),
               "--port", "0", "--metrics-port", "0", "--log-level", log_level]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        self.command = " ".join(cmd)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.model, self.port, self.metrics_port = self._wait_serving(timeout_s)
        self.url = f"127.0.0.1:{self.port}"
        self.wait_ready(timeout_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_serving(self, timeout_s: float) -> tuple[str, int, int | None]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = _SERVING.search(self.log.read_text())
            if m:
                return m.group(1), int(m.group(2)), (None if m.group(3) == "None" else int(m.group(3)))
            if self.proc.poll() is not None:
                raise RuntimeError(f"robustgate serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"robustgate serve did not start in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.url} not ready after {timeout_s} s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful drain); returns the exit code (kills after ``timeout_s``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def percentile_ms(latencies_s, q: float) -> float | None:
    a = np.asarray(latencies_s, dtype=np.float64)
    return float(np.percentile(a, q) * 1e3) if a.size else None


def write_results(name: str, data: dict, markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(data, indent=2) + "\n")
    md.write_text(markdown)
    return js, md
