"""A replica with ``server.workers: 2`` (proxy/workers.py) as a real ``robustgate serve`` subprocess,
for the tests that check a behaviour holds across worker processes (tests/proxy/test_workers.py,
tests/hardening/test_upstream_faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

SERVE_WITH_SLEEP = Path(__file__).resolve().parents[1] / "proxy" / "serve_with_sleep.py"
WORKERS = 2


class Replica:
    """``tests/proxy/serve_with_sleep.py serve --config`` (``plain``: ``robustgate serve``) with
    ``server.workers: 2`` and its own metrics directory (PROMETHEUS_MULTIPROC_DIR); ``backend``: the
    config's backend section (default: the bundle's ONNX Runtime)."""

    def __init__(self, tmp_path: Path, bundle: Path, stages: list, admin: bool = False, batching: dict | None = None,
                 limits: dict | None = None, backend: dict | None = None, model_name: str | None = None,
                 plain: bool = False):
        import yaml

        self.mpdir = tmp_path / "metrics"
        server = {"host": "127.0.0.1", "metrics_host": "127.0.0.1", "grace_s": 60, "workers": WORKERS}
        if admin:
            server["admin"] = {"enabled": True, "port": 0}
        cfg = {"bundle": str(bundle), "server": server,
               # default: one request per batch, one batch at a time
               "batching": batching or {"enabled": False, "workers": 1},
               "pipeline": {"stages": stages}, **({"limits": limits} if limits else {}),
               **({"backend": backend} if backend else {}), **({"model_name": model_name} if model_name else {})}
        self.config = tmp_path / "proxy.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTGATE_")}
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.mpdir)
        # plain: robustgate's own command line, without the test-only defense (and the defenses.base
        # import that registering it takes)
        command = ["-m", "robustgate.proxy.cli"] if plain else [str(SERVE_WITH_SLEEP)]
        self.proc = subprocess.Popen(
            [sys.executable, *command, "serve", "--config", str(self.config), "--port", "0",
             "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("robustgate: serving"):
                break
        else:
            raise AssertionError("".join(self.lines))
        words = self.lines[-1].replace(",", "").split()
        self.port, self.metrics_port = int(words[words.index("port") + 1]), int(words[words.index("metrics") + 3])
        self.admin_port = int(words[words.index("admin") + 3]) if admin else None
        self.url = f"127.0.0.1:{self.port}"

    def per_worker(self, sample: str, labels: dict) -> dict[str, float]:
        """{worker pid: value} of one counter sample, read from each worker's own file."""
        out = {}
        for f in self.mpdir.glob("counter_*.db"):
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(f)):
                if f'"{sample}"' in key and all(f'"{k}": "{v}"' in key for k, v in labels.items()):
                    out[f.stem.split("_")[-1]] = out.get(f.stem.split("_")[-1], 0.0) + value
        return out

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        return code, self.proc.stdout.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
