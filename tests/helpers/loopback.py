"""A real proxy server in the test process: ``robustgate serve``'s own ``build_server`` on free
loopback ports, its event loop in a daemon thread, so that a test talks to it over real gRPC
(tritonclient) while it can still reach into the server object. Imported by test modules (this
folder is on pytest's pythonpath, pyproject.toml)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from robustgate.proxy.config import load_config
from robustgate.proxy.serve import build_server


class LoopbackProxy:
    """``LoopbackProxy(bundle, pipeline[, sections])``: serves ``bundle`` with the ``pipeline``
    config section (and any other ``sections``, e.g. ``{"batching": {...}}``) on 127.0.0.1; ``url``
    is ``host:port``, ``server`` the ProxyServer; ``stop()`` drains it. ``config_file``: a config to
    start from (e.g. deploy/default.yaml; ``pipeline`` None keeps its stages), one serving process."""

    def __init__(self, bundle: str | Path, pipeline: dict | None = None, sections: dict | None = None,
                 config_file: Path | None = None):
        server = {**(sections or {}).get("server", {}), "host": "127.0.0.1", "port": 0, "metrics_port": 0,
                  "metrics_host": "127.0.0.1"}
        if config_file is not None:
            server.setdefault("workers", 1)
        cfg = load_config(config_file, environ={}, overrides={
            **(sections or {}), "bundle": str(bundle), **({} if pipeline is None else {"pipeline": pipeline}),
            "server": server})
        self.server = build_server(cfg)
        self.prepare()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = f"127.0.0.1:{self._call(self.server.start())}"

    def prepare(self) -> None:
        """Hook for subclasses: runs after the server is built, before it starts."""

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self._call(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
