"""``robustgate serve``: config -> bundle -> backend -> pipeline -> batcher -> gRPC server + metrics.

``robustgate serve --bundle DIR`` runs with defaults (onnxruntime on cpu, no defense stages,
batching on); ``robustgate serve --config FILE`` reads the YAML config (docs/PROTOCOL.md and
proxy/config.py). ``--bundle``, ``--model-name``, ``--port``, ``--metrics-port`` and ``--host``
override the config. A bad config or bundle
exits 2 with a message naming the key or file; SIGTERM/SIGINT drain gracefully and exit 0; SIGHUP
re-reads the config file and the bundle and swaps in the new pipeline (thresholds, actions, stage
params) without dropping requests -- a bad new config is logged and the running one kept
(ProxyServer.reload; docs/OPERATIONS.md "Hot reload").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Coroutine

from robustgate.models.bundle import Bundle, BundleError
from robustgate.models.client_values import ClientValues
from robustgate.models.output_kind import reads_probabilities
from robustgate.defenses.stateful.remote import STORE_SOCKET_ENV
from robustgate.proxy.backends.base import Backend
from robustgate.proxy.config import ConfigError, ProxyConfig, ServerConfig, load_config
from robustgate.proxy.priority import call_at_priority
from robustgate.proxy.workers import default_threads, default_workers, resolved_workers, supervise

if TYPE_CHECKING:
    from robustgate.proxy.server import ProxyServer

# The pipeline's modules (the assembly, the defenses, the server; torch with them) are imported by the
# functions that build a server, not with this module: the supervisor of server.workers processes
# reads the config, resolves the workers and starts them without them (~300 MiB and ~1.4 s of torch;
# bench/results/hardening.startup.md); each worker, or the single process, imports them.

log = logging.getLogger("robustgate.proxy")


EPILOG = """\
examples:
  # the shipped pipeline (bundles/default behind the MagNet detector), from the repository root
  robustgate serve --config deploy/default.yaml

  # the same on any free port; the chosen ports are printed
  robustgate serve --config deploy/default.yaml --port 0 --metrics-port 0

  # a bundle with no defense stages, under another model name
  robustgate serve --bundle bundles/default --model-name fmnist

Flags override the config file, which overrides the built-in defaults (docs/OPERATIONS.md,
"Configuration reference"; every key is also an environment variable, ROBUSTGATE_SERVER__PORT=9000).
The admin Reload RPC is off unless server.admin enables it; SIGHUP reloads either way
(docs/OPERATIONS.md, "Hot reload" and "Threat model"). The protocol: docs/PROTOCOL.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the defaults named in the help are the config's own (proxy/config.py), so they stay true
    server = ServerConfig.model_fields
    parser.epilog = EPILOG
    parser.add_argument("--config", type=Path, help="YAML config file (default: none, built-in defaults; "
                        "reference: docs/OPERATIONS.md)")
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the config's `bundle`)")
    parser.add_argument("--model-name", help="model name served to clients (default: the config's `model_name`, "
                        "else the bundle's name)")
    parser.add_argument("--port", type=int, help=f"gRPC port; 0 = any free port (default: the config's "
                        f"server.port, else {server['port'].default})")
    parser.add_argument("--metrics-port", type=int, help=f"Prometheus /metrics HTTP port (default: the config's "
                        f"server.metrics_port, else {server['metrics_port'].default})")
    parser.add_argument("--host", help=f"address to bind (default: the config's server.host, else {server['host'].default})")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                        help="logging level; INFO logs each rejection with its score and threshold")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    overrides: dict = {}
    if args.bundle is not None:
        overrides["bundle"] = str(args.bundle)
    if getattr(args, "model_name", None):
        overrides["model_name"] = args.model_name
    server = {}
    if args.port is not None:
        server["port"] = args.port
    if args.metrics_port is not None:
        server["metrics_port"] = args.metrics_port
    if getattr(args, "host", None):
        server["host"] = args.host
    if server:
        overrides["server"] = server
    return load_config(args.config, overrides=overrides)


def make_backend(cfg: ProxyConfig, bundle: Bundle) -> Backend:
    """The configured backend. ``onnxruntime`` on ``cuda`` (or ``auto`` on a machine with a CUDA
    device) without onnxruntime-gpu runs the bundle's torch twin on the GPU instead, said once in
    the log here and in ``robustgate_backend_info{provider}``."""
    from robustgate.defenses.assemble import resolve_device

    if cfg.backend.kind == "torch":
        from robustgate.proxy.backends.torch import TorchBackend

        device = resolve_device(cfg.backend.torch.device or cfg.pipeline.device)
        return TorchBackend(bundle, device=device, precision=cfg.backend.precision)
    if cfg.backend.kind == "onnxruntime":
        from robustgate.proxy.backends.onnx import OnnxBackend, has_cuda_provider

        o = cfg.backend.onnxruntime
        wants_gpu = o.device == "cuda" or (o.device == "auto" and resolve_device("auto") == "cuda")
        if wants_gpu and not has_cuda_provider():
            from robustgate.proxy.backends.torch import TorchBackend

            device = resolve_device(o.device)  # ValueError when cuda is asked for and torch sees none
            log.warning("backend.onnxruntime.device is %r but this onnxruntime has no CUDAExecutionProvider "
                        "(onnxruntime-gpu is not installed): the backbone runs as the bundle's torch twin on %s",
                        o.device, device)
            return TorchBackend(bundle, device=device, precision=cfg.backend.precision,
                                provider="torch (onnxruntime has no CUDA provider)")
        # 0: the physical cores the process is given, as an explicit count (config.OnnxRuntimeConfig)
        return OnnxBackend(bundle, device=o.device, intra_op_threads=o.intra_op_threads or default_threads(),
                           inter_op_threads=o.inter_op_threads, spinning=o.spinning)
    from robustgate.proxy.backends import upstream

    u = cfg.backend.upstream.model_dump()
    u["model_name"] = u["model_name"] or bundle.name
    return upstream.UpstreamBackend(**u, max_message_bytes=cfg.server.max_message_bytes,
                                   layout=bundle.input.layout, probabilities=reads_probabilities(bundle),
                                   client_values=ClientValues.of(bundle.input),
                                   value_range=tuple(bundle.input.value_range))


def local_classifier(cfg: ProxyConfig, bundle: Bundle, backend: Backend):
    """The local backbone detectors may query: the backend's own session or twin, or a CPU one."""
    if not cfg.pipeline.stages:
        return None
    from robustgate.proxy.backends.onnx import OnnxBackend, OnnxClassifier
    from robustgate.proxy.backends.torch import TorchBackend

    if isinstance(backend, TorchBackend):
        return backend.classifier()  # the twin, on the backend's device
    if isinstance(backend, OnnxBackend):
        return OnnxClassifier(backend)
    if bundle.spec.backbone.onnx is None:
        return None  # imported from the upstream without its ONNX file: stateless stages only
    return OnnxClassifier(OnnxBackend(bundle, device="cpu", intra_op_threads=1, inter_op_threads=1))


def _build_pipeline(cfg: ProxyConfig, bundle: Bundle):
    """The backend and the pipeline runner around it (the backend is closed if the runner fails). In
    a worker of ``server.workers`` > 1 the in-memory stateful stores are the supervisor's, shared by
    the workers (its socket in ``STORE_SOCKET_ENV``; proxy/workers.py, defenses/stateful/remote.py)."""
    from robustgate.defenses.assemble import build_runner

    backend = make_backend(cfg, bundle)
    try:
        return backend, build_runner(cfg.pipeline, bundle, backend, local_classifier(cfg, bundle, backend),
                                     store_service=os.environ.get(STORE_SOCKET_ENV) or None)
    except Exception:
        backend.close()
        raise


def set_purify_threads(cfg: ProxyConfig) -> int:
    """``pipeline.purify_threads``, else the cores the process is given (proxy/workers.py), for the
    purifiers that compute parts of a batch at once (defenses/purify/parts.py; process-wide). Returns
    the count set."""
    from robustgate.defenses.purify import parts as purify_parts

    n = cfg.pipeline.purify_threads or default_workers()
    purify_parts.set_threads(n)
    return n


def build_server(cfg: ProxyConfig, config_loader=None, freeze_heap: bool = False) -> ProxyServer:
    """Everything but the event loop; raises BundleError / ValueError with a precise message.
    ``config_loader() -> ProxyConfig`` is what a hot reload re-reads (None: reload refused);
    ``freeze_heap``: the process is the server's own (``robustgate serve``), see ProxyServer."""
    from robustgate.proxy.server import ProxyServer

    bundle = Bundle.load(cfg.bundle)
    set_purify_threads(cfg)
    # sessions built at compute priority: the pools they start inherit it (proxy/priority.py)
    backend, runner = call_at_priority(cfg.server.compute_nice, _build_pipeline, cfg, bundle)
    revision = str(bundle.spec.provenance.get("code_revision", "unknown"))
    server = ProxyServer(cfg, bundle, backend, runner, revision=revision, config_loader=config_loader,
                         freeze_heap=freeze_heap)
    server.metrics.backend_info(**backend.info())  # which backbone runtime serves, and where
    return server


async def serve(server: ProxyServer, announce=None) -> None:
    """Serves until SIGTERM/SIGINT, then drains; SIGHUP reloads. ``announce(server)``, once serving:
    a worker's report to its supervisor (proxy/workers.py) instead of the "serving" line."""
    from robustgate.proxy.reload import ReloadError

    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    async def reload() -> None:
        try:
            await server.reload()
        except ReloadError:  # logged by reload(); the running pipeline stays
            pass

    def on_sighup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    admin = f", admin on port {server.admin_port}" if server.admin_port is not None else ""
    if announce is None:
        print(f"robustgate: serving {server.contract.model_name} on port {server.port}, metrics on port "
              f"{server.metrics_port}{admin}", flush=True)
    else:
        announce(server)
    await stop.wait()
    if announce is None:
        print("robustgate: draining", flush=True)
    await server.stop()
    if announce is None:
        print("robustgate: stopped", flush=True)


def loop_runner(kind: str) -> Callable[[Coroutine], object]:
    """``server.event_loop`` -> the function that runs the server's coroutine to completion on a new loop:
    ``uvloop.run`` or ``asyncio.run``; ``auto``: uvloop where it is installed. ConfigError when uvloop is
    asked for and missing. grpc.aio runs on any asyncio loop; on uvloop's C loop its per-call floor
    costs less CPU (bench/results/hardening.rpc_floor.md)."""
    if kind == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError as exc:
        if kind == "uvloop":
            raise ConfigError(f"server.event_loop: uvloop is not installed ({exc}); pip install uvloop, or use "
                              f"auto or asyncio") from exc
        return asyncio.run
    return uvloop.run


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        workers = resolved_workers(cfg)
        run_loop = loop_runner(cfg.server.event_loop)  # refused here, once, before any worker starts
        if workers > 1:  # a supervisor and its worker processes on the one port (proxy/workers.py)
            return supervise(args, cfg, workers)
        from robustgate.defenses.assemble import pin_torch_threads

        pin_torch_threads()  # torch's OpenMP pool stalls the pipeline on shared cores (defenses/assemble.py)
        server = build_server(cfg, config_loader=lambda: config_from_args(args), freeze_heap=True)
    except (ConfigError, BundleError, ValueError, OSError) as exc:
        print(f"robustgate serve: {exc}", file=sys.stderr)
        return 2
    log.info("event loop: %s", run_loop.__module__.split(".")[0])
    try:
        run_loop(serve(server))
    except OSError as exc:  # e.g. the port is taken
        print(f"robustgate serve: {exc}", file=sys.stderr)
        server.backend.close()
        return 2
    return 0
