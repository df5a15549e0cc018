"""``server.workers``: N serving processes on one port, under one supervisor (docs/OPERATIONS.md, "Workers").

One grpc.aio event loop answers every call of a process, and past a few thousand calls a second
that loop, not the model, is a replica's limit (bench/results/hardening.rpc_floor.md). With
``server.workers: N`` > 1, ``robustgate serve`` becomes a supervisor that starts N worker processes
(multiprocessing's *spawn*: each imports afresh, no gRPC or torch state crosses a fork); each builds
its own backend sessions, pipeline, batcher and event loop, exactly the single-process server, and
binds the same gRPC port with ``SO_REUSEPORT`` (gRPC's ``grpc.so_reuseport``): the kernel spreads
connections over the workers. ``N = 1`` runs today's single process, unchanged (proxy/serve.py).

- Port: the supervisor checks the port is free (a bind without SO_REUSEPORT, so a port another
  server holds is refused as before; ``0`` becomes a concrete free port) and hands it to the workers.
- Metrics: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory, or the one the
  environment names, emptied) before the workers import prometheus_client; workers serve no metrics
  port, the supervisor serves the merged values (proxy/metrics.py ``serve_merged``) and, when a worker
  is gone, removes its live gauges (``mark_process_dead``).
- Health: per process. Each worker answers ServerReady and grpc.health.v1 for itself (a probe reaches
  one of them); the supervisor announces "serving" only once every worker is serving, and a worker
  that exits unexpectedly stops the whole replica (the others drain, the supervisor exits 1) so that
  Kubernetes restarts the container instead of leaving a replica with fewer workers than sized.
- Drain: SIGTERM/SIGINT to the supervisor is forwarded to every worker as SIGTERM; each drains as a
  single server does (``server.grace_s``) and the supervisor waits for all of them.
- Reload: SIGHUP to the supervisor is relayed to every worker. The admin Reload RPC reaches one
  worker (on the inference port, whichever the connection landed on; on its own port, worker 0, the
  only one that binds it); that worker reloads, answers, and asks the supervisor to relay SIGHUP to
  the others, which re-read the same files.
- Stateful stages: the kernel spreads connections, so a history kept in each worker would split a
  client with several connections over several histories. The supervisor therefore holds the
  replica's in-memory stores (``store: {kind: memory}``, Blacklight's and the k-NN method's) in a
  store service on a Unix socket of its own (defenses/stateful/remote.py) and hands its path to the
  workers (``ROBUSTGATE_STORE_SOCKET``): each query is scored on its client's one history whichever
  worker answers it, and reloads keep it. A ``store: {kind: redis}`` history is shared as before.
- Per-client limits: the memory limiter is per worker, so a client with N connections gets up to N
  times the limits. Without ``server.workers`` such a config runs one process (:func:`resolved_workers`);
  with N > 1 use ``limits.per_client.store: {kind: redis}`` so that a client's limits are one.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from robustgate.defenses.stateful.remote import STORE_SOCKET_ENV, StoreService
from robustgate.proxy.config import ProxyConfig

log = logging.getLogger("robustgate.proxy")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY, RELOADED, FAILED = "ready", "reloaded", "failed"  # worker -> supervisor messages


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), or None when there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; all of them where the platform has none)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def default_workers() -> int:
    """The cores the container is given: the CPUs this process may run on, capped by a cgroup CPU
    quota rounded up (a 1.5-core limit gets 2 workers)."""
    n = len(allowed_cpus())
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


# a worker's own memory beside its bundle's files (bench/results/hardening.startup.md: ~340 MiB with
# deploy/default.yaml and torch's CUDA wheel), with headroom; the supervisor's own is ~31 MiB there
WORKER_BASE_BYTES = 512 * 2**20
SUPERVISOR_BYTES = 64 * 2**20


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit in bytes (cgroup v2 ``memory.max``, else v1
    ``memory/memory.limit_in_bytes``), or None when there is none or it cannot be read."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= 2**60 else value  # v1 writes "no limit" as a number near 2**63
    return None


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The memory the processes may use, in bytes: the container's limit, or the machine's
    ``MemAvailable`` if that is less; None when neither can be read."""
    known = [cgroup_memory()]
    try:
        line = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        known.append(int(line.split()[1]) * 1024)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    known = [v for v in known if v is not None]
    return min(known) if known else None


def worker_memory(bundle: str | Path) -> int:
    """A worker's expected memory in bytes: :data:`WORKER_BASE_BYTES` plus twice the bundle's files
    (ONNX Runtime's session holds the backbone's weights, and the defenses' models, once more)."""
    files = [f for f in Path(bundle).rglob("*") if f.is_file()] if Path(bundle).is_dir() else []
    return WORKER_BASE_BYTES + 2 * sum(f.stat().st_size for f in files)


def physical_cores(cpus: Iterable[int] | None = None, root: Path = Path("/sys/devices/system/cpu")) -> int:
    """The physical cores (distinct package and core ids in sysfs) among ``cpus`` (default: the CPUs
    this process may run on); the number of CPUs where the topology cannot be read."""
    cpus = allowed_cpus() if cpus is None else list(cpus)
    try:
        cores = {tuple((root / f"cpu{c}" / "topology" / name).read_text().strip()
                       for name in ("physical_package_id", "core_id")) for c in cpus}
    except OSError:
        return max(1, len(cpus))
    return max(1, len(cores))


def default_threads() -> int:
    """The threads a process's compute pool uses by default: the cores it is given
    (:func:`default_workers`), no more than the physical cores among them (two hyperthreads share one
    core's arithmetic units; ONNX Runtime's own default counts physical cores too)."""
    return max(1, min(default_workers(), physical_cores()))


def cores_per_worker(workers: int) -> int:
    """A worker's share of the threads (:func:`default_threads`), at least 1: what
    ``backend.onnxruntime.intra_op_threads: 0`` and ``pipeline.purify_threads: null`` resolve to in a
    worker, so that N workers' pools together fit the cores instead of N times over."""
    return max(1, default_threads() // workers)


def gpu_devices(cfg: ProxyConfig) -> list[str]:
    """The config keys that put work on a CUDA device (``auto`` counts when torch sees one)."""
    keys = {"pipeline.device": cfg.pipeline.device, "backend.onnxruntime.device": (
        cfg.backend.onnxruntime.device if cfg.backend.kind == "onnxruntime" else None),
        "backend.torch.device": cfg.backend.torch.device if cfg.backend.kind == "torch" else None}
    keys.update({f"pipeline.stages[{s.name}].device": s.device for s in cfg.pipeline.stages})
    if "auto" in keys.values():
        import torch  # only to resolve "auto"; the serving process imports it anyway

        cuda = torch.cuda.is_available()
        keys = {k: ("cuda" if cuda else "cpu") if v == "auto" else v for k, v in keys.items()}
    return [k for k, v in keys.items() if v == "cuda"]


def per_process_state(cfg: ProxyConfig) -> list[str]:
    """The config keys whose per-client state lives in one process's memory: ``limits.per_client``
    with its default ``store: {kind: memory}``. Over N workers the kernel spreads *connections*, so
    such state is split N ways, and a client that opens N connections gets N times the rate limits.
    (The stateful stages' memory stores are not per process: the supervisor shares them, module
    docstring.)"""
    keys = []
    limits = cfg.limits.per_client
    if (limits.rate_per_s is not None or limits.budget is not None) and limits.store.kind == "memory":
        keys.append("limits.per_client")
    return keys


def resolved_workers(cfg: ProxyConfig) -> int:
    """``server.workers``, else one process when any work is on a GPU or any per-client state is
    per process (:func:`per_process_state`), else the cores -- as many of them as the memory the
    container may use holds workers (:func:`worker_memory` each, :func:`available_memory`).

    On a GPU one process batches for the device: N processes would hold N CUDA contexts and the
    models N times in device memory and split the traffic into N smaller batches, which is what a
    GPU serves worst; the event loop's CPU is rarely the limit there. A per-process limit
    split over N workers is weaker by about N against a client that opens N connections, so it gets
    one process unless ``server.workers`` says otherwise (then a warning at start-up names the keys).
    Set ``server.workers`` to override (e.g. when decode, not the GPU, is the limit)."""
    local = per_process_state(cfg)
    if cfg.server.workers is not None:
        if cfg.server.workers > 1 and local:
            log.warning("server.workers: %d with per-process client state (%s): each worker keeps its own, and a "
                        "client that opens several connections gets up to %d times the limits; use "
                        "limits.per_client.store: {kind: redis} to share them, or server.workers: 1",
                        cfg.server.workers, ", ".join(local), cfg.server.workers)
        return cfg.server.workers
    gpu = gpu_devices(cfg)
    if gpu:
        log.info("server.workers: 1 (work on a GPU: %s); set server.workers to run more processes", ", ".join(gpu))
        return 1
    if local and default_workers() > 1:
        log.info("server.workers: 1 (per-process client state: %s; N workers would split each client's limits "
                 "over N processes by connection); set server.workers to run more processes", ", ".join(local))
        return 1
    cores, memory = default_workers(), available_memory()
    if cores > 1 and memory is not None:  # as many as the memory holds: more would be OOM-killed at start
        per = worker_memory(cfg.bundle)
        fits = max(1, (memory - SUPERVISOR_BYTES) // per)
        if fits < cores:
            log.info("server.workers: %d, not the %d cores: the memory the container may use (%d MiB) holds %d "
                     "workers of about %d MiB each (proxy/workers.py, worker_memory); set server.workers, or give "
                     "the container more memory", fits, cores, memory // 2**20, fits, per // 2**20)
            return fits
    return cores


def _free_port(host: str, port: int) -> int:
    """``port`` if nothing listens on it (``0``: a free one), checked by a bind without SO_REUSEPORT,
    which a port another server holds refuses. Raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "::", "[::]") else host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind_host, port))
        except OSError as exc:
            raise OSError(f"cannot bind the gRPC port {host}:{port}: {exc}") from exc
        return int(s.getsockname()[1])


def worker_config(cfg: ProxyConfig, index: int, port: int, admin_port: int | None, workers: int = 1) -> ProxyConfig:
    """Worker ``index``'s config (of ``workers``): the shared port, no metrics port of its own (the
    supervisor serves the merged metrics), the admin service's own port on worker 0 only, and thread
    pools left to their defaults sized to its share of the cores (:func:`cores_per_worker`)."""
    server = {"port": port, "metrics_port": None, "workers": 1}
    admin = cfg.server.admin
    if admin.enabled and admin.port is not None:
        server["admin"] = admin.model_copy(update={"port": admin_port} if index == 0 else {"enabled": False})
    update = {"server": cfg.server.model_copy(update=server)}
    share = cores_per_worker(workers)
    if cfg.backend.onnxruntime.intra_op_threads == 0:
        update["backend"] = cfg.backend.model_copy(update={"onnxruntime": cfg.backend.onnxruntime.model_copy(
            update={"intra_op_threads": share})})
    if cfg.pipeline.purify_threads is None:
        update["pipeline"] = cfg.pipeline.model_copy(update={"purify_threads": share})
    return cfg.model_copy(update=update)


def _die_with(supervisor: int) -> None:
    """Linux: this worker gets SIGTERM (and drains) when its supervisor dies, even by SIGKILL, rather
    than serve on as an orphan; exits at once if the supervisor is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != supervisor:
        sys.exit(1)


def _worker_main(args: argparse.Namespace, index: int, workers: int, port: int, admin_port: int | None, conn,
                 supervisor: int) -> None:
    """One worker process: the single-process server on the shared port (proxy/serve.py)."""

    _die_with(supervisor)

    from robustgate.defenses.assemble import pin_torch_threads
    from robustgate.models.bundle import BundleError
    from robustgate.proxy import serve as serve_mod
    from robustgate.proxy.config import ConfigError

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    pin_torch_threads()

    def load() -> ProxyConfig:
        return worker_config(serve_mod.config_from_args(args), index, port, admin_port, workers)

    try:
        cfg = load()
        run_loop = serve_mod.loop_runner(cfg.server.event_loop)
        server = serve_mod.build_server(cfg, config_loader=load, freeze_heap=True)
    except (ConfigError, BundleError, ValueError, OSError) as exc:  # the supervisor prints it, once
        conn.send((FAILED, str(exc)))
        sys.exit(2)
    server.reuse_port = True
    server.after_admin_reload = lambda: conn.send(RELOADED)
    try:
        run_loop(serve_mod.serve(server, announce=lambda s: conn.send((READY, s.contract.model_name))))
    except OSError as exc:  # e.g. the port could not be bound
        conn.send((FAILED, str(exc)))
        server.backend.close()
        sys.exit(2)


class Supervisor:
    """Starts, watches, relays signals to and drains ``n`` workers (module docstring)."""

    def __init__(self, args: argparse.Namespace, cfg: ProxyConfig, n: int):
        self.args, self.cfg, self.n = args, cfg, n
        self.procs: list = []
        self.conns: list = []
        self._stop = False
        self._hup = 0
        self._own_dir: str | None = None
        self._store: StoreService | None = None
        self._http = None

    def _metrics_dir(self) -> str:
        path = os.environ.get(MULTIPROC_ENV)
        if path:
            Path(path).mkdir(parents=True, exist_ok=True)
            for f in Path(path).glob("*.db"):  # a previous run's values would be summed in
                f.unlink()
        else:
            path = self._own_dir = tempfile.mkdtemp(prefix="robustgate-metrics-")
        return path

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            self._hup += 1
        else:
            self._stop = True

    def _relay_hup(self, skip: int | None = None) -> None:
        for i, p in enumerate(self.procs):
            if i != skip and p.is_alive():
                os.kill(p.pid, signal.SIGHUP)

    def run(self) -> int:
        s = self.cfg.server
        port = _free_port(s.host, s.port)
        a = s.admin
        admin_port = _free_port(a.host, a.port) if a.enabled and a.port is not None else None
        mpdir = self._metrics_dir()
        self._store = StoreService()  # the replica's in-memory stateful stores, shared by the workers
        store_path = self._store.start()
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        ctx = multiprocessing.get_context("spawn")
        # the workers inherit the environment when they start, before they import prometheus_client;
        # this process keeps its own (it reads the directory by path)
        previous = {name: os.environ.get(name) for name in (MULTIPROC_ENV, STORE_SOCKET_ENV)}
        os.environ[MULTIPROC_ENV] = mpdir
        os.environ[STORE_SOCKET_ENV] = store_path
        try:
            for i in range(self.n):
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker_main, args=(self.args, i, self.n, port, admin_port, child, os.getpid()),
                                name=f"robustgate-worker-{i}", daemon=False)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            _restore(previous)
            if not self._wait_ready():
                return 0 if self._stop else 2  # stopped while starting, or a worker could not start
            metrics_port = None
            if s.metrics_port is not None:
                self._http = _serve_metrics(s.metrics_port, s.metrics_host, mpdir)
                metrics_port = int(self._http[0].server_address[1])
            admin = f", admin on port {admin_port}" if admin_port is not None else ""
            print(f"robustgate: serving {self.model} on port {port}, metrics on port "
                  f"{metrics_port}{admin} ({self.n} workers)", flush=True)
            return self._watch()
        finally:
            _restore(previous)
            self._shutdown(mpdir)
            for sig, handler in handlers.items():  # the caller's (a test's) handlers back
                signal.signal(sig, handler)

    def _wait_ready(self) -> bool:
        """Until every worker says it serves; False (after stopping the rest) if one exits first."""
        waiting = set(range(self.n))
        self.model = "?"
        while waiting and not self._stop:
            ready = multiprocessing.connection.wait([self.conns[i] for i in waiting]
                                                    + [self.procs[i].sentinel for i in waiting], timeout=0.5)
            for i in list(waiting):
                if self.conns[i] in ready:
                    try:
                        message = self.conns[i].recv()
                        if message[0] == READY:
                            waiting.discard(i)
                            self.model = message[1]
                        elif message[0] == FAILED:  # a bad config or bundle: every worker says the same
                            print(f"robustgate serve: {message[1]}", file=sys.stderr, flush=True)
                            return False
                    except EOFError:
                        pass
                if i in waiting and not self.procs[i].is_alive():
                    log.error("worker %d exited with %s before serving", i, self.procs[i].exitcode)
                    return False
        return not self._stop

    def _watch(self) -> int:
        """Relays reloads until a stop signal (-> 0) or a worker's unexpected exit (-> 1)."""
        while not self._stop:
            if self._hup:
                self._hup = 0
                self._relay_hup()
            live = [c for c, p in zip(self.conns, self.procs) if p.is_alive()]
            ready = multiprocessing.connection.wait(live + [p.sentinel for p in self.procs], timeout=0.2)
            for i, (c, p) in enumerate(zip(self.conns, self.procs)):
                if c in ready and p.is_alive():
                    try:
                        if c.recv() == RELOADED:  # an admin RPC reloaded worker i: the others follow
                            self._relay_hup(skip=i)
                    except EOFError:
                        pass
                if not p.is_alive() and not self._stop:
                    log.error("worker %d (pid %d) exited with %s; stopping the replica", i, p.pid, p.exitcode)
                    return 1
        return 0

    def _shutdown(self, mpdir: str) -> None:
        print("robustgate: draining", flush=True)
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.grace_s + 30.0
        codes = []
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not drain in time; killing it", p.pid)
                p.kill()
                p.join(10)
            codes.append(p.exitcode)
            _mark_dead(p.pid, mpdir)
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        if self._store is not None:
            self._store.close()
        print("robustgate: stopped", flush=True)
        self.exit_codes = codes


def _serve_metrics(port: int, host: str, path: str):
    from robustgate.proxy.metrics import serve_merged

    return serve_merged(port, host, path)


def _mark_dead(pid: int, path: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


def _restore(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def supervise(args: argparse.Namespace, cfg: ProxyConfig, n: int) -> int:
    """``robustgate serve`` with ``n`` > 1 workers; the exit code (0: drained cleanly)."""
    sup = Supervisor(args, cfg, n)
    try:
        rc = sup.run()
    except OSError as exc:  # e.g. the port is taken
        print(f"robustgate serve: {exc}", file=sys.stderr)
        return 2
    if rc == 0 and any(code != 0 for code in getattr(sup, "exit_codes", [])):
        rc = 1
    return rc
