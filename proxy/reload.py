"""Hot reload of the proxy's pipeline (SIGHUP, or the ``robustgate.admin.v1.Admin/Reload`` RPC).

:func:`prepare_reload` does everything that can fail off the event loop (re-reads the config and the
bundle, checksums verified, builds the new runner through the one assembly on the running
backend, warms it when ``server.warmup`` is on (proxy/warmup.py; a pipeline that fails there is refused),
re-reads the bearer token) and touches nothing the server uses; :func:`reload` swaps the
result in with one attribute store, so batches already running finish on the old pipeline and
nothing is dropped. Anything invalid raises :class:`ReloadError` and keeps the running pipeline.
``ProxyServer.reload`` / ``ProxyServer._prepare_reload`` call these.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from robustgate.defenses.assemble import PipelineRunner, build_runner
from robustgate.models.bundle import Bundle, BundleError
from robustgate.proxy.config import ConfigError, ProxyConfig
from robustgate.proxy.priority import call_at_priority
from robustgate.proxy.warmup import describe

if TYPE_CHECKING:
    from robustgate.proxy.server import ProxyServer

log = logging.getLogger("robustgate.proxy")


class ReloadError(Exception):
    """A reload refused; the running pipeline is kept. The message says why."""


def read_token(path: Path) -> bytes:
    return Path(path).read_bytes().strip()


async def reload(self: "ProxyServer") -> dict:
    """``ProxyServer.reload``: re-reads the config (``config_loader``) and the bundle (checksums verified) and swaps in
    the new pipeline -- thresholds, actions, stage params, failure policy, verdict mode, output
    policy; stateful stages keep their stores (histories, blocks) when their ``store:`` is unchanged -- and
    the bearer token file's token. Batches already running finish on the old pipeline; nothing
    is dropped. Anything invalid raises :class:`ReloadError` and keeps the running pipeline.
    Changes outside ``pipeline`` (ports, backend, batching, limits, bundle path) need a restart;
    they are listed in the answer's ``ignored`` and logged. Returns a summary."""
    async with self._reload_lock:
        try:
            # built at compute priority: the new sessions' pools inherit it (proxy/priority.py)
            cfg, runner, token = await asyncio.get_running_loop().run_in_executor(
                None, call_at_priority, self.cfg.server.compute_nice, self._prepare_reload)
        except ReloadError as exc:
            self.metrics.reloads.labels(result="error").inc()
            log.error("reload refused, keeping the running pipeline: %s", exc)
            raise
        ignored = [k for k in ("bundle", "model_name", "server", "backend", "batching", "limits")
                   if getattr(cfg, k) != getattr(self.cfg, k)]
        self.runner = runner  # one attribute store: the next batch runs the new pipeline
        self.cfg = self.cfg.model_copy(update={"pipeline": cfg.pipeline, "outputs": cfg.outputs})
        self._token = token
        for stage in runner.stages:
            self.metrics.rejections.labels(detector=stage.name)
        self.metrics.watch_stateful(runner.stateful_names)
        self.metrics.reloads.labels(result="ok").inc()
        if self.freeze_heap:
            from robustgate.proxy.server import freeze_gc_heap  # here: proxy/server.py imports this module

            freeze_gc_heap()  # the new pipeline's objects join the frozen heap
        summary = self.pipeline_summary()
        summary["ignored"] = ignored
        log.info("reloaded the pipeline: %s", summary)
        if ignored:
            log.warning("reload: changes to %s need a restart and were not applied", ", ".join(ignored))
        return summary


def prepare_reload(self: "ProxyServer") -> tuple[ProxyConfig, PipelineRunner, bytes | None]:
    """Everything that can fail, off the event loop; touches nothing the server uses."""
    if self.config_loader is None:
        raise ReloadError("this server has no config source to reload from")
    try:
        cfg = self.config_loader()
    except (ConfigError, ValueError, OSError) as exc:
        raise ReloadError(str(exc)) from None
    if Path(cfg.bundle).resolve() != Path(self.cfg.bundle).resolve():
        raise ReloadError(f"bundle: {cfg.bundle} is not the served bundle {self.cfg.bundle}; restart to change it")
    try:
        bundle = Bundle.load(cfg.bundle)
    except (BundleError, ValueError, OSError) as exc:
        raise ReloadError(f"bundle {cfg.bundle}: {exc}") from None
    if bundle.spec.backbone.onnx != self.bundle.spec.backbone.onnx:  # None: no ONNX file (upstream-only)
        raise ReloadError("the bundle's backbone changed; restart to serve a new backbone")
    if bundle.spec.backbone.output_kind != self.bundle.spec.backbone.output_kind:  # the backend converts at load
        raise ReloadError("the bundle's backbone.output_kind changed; restart to serve it")
    if bundle.input != self.bundle.input:  # the request contract (shape, layout, range, normalization)
        raise ReloadError("the bundle's input changed; restart to serve it")
    old = self.runner
    try:
        # the stateful stages' stores are handed over: a reload keeps the histories and blocks
        runner = build_runner(cfg.pipeline, bundle, old.backend, old.classifier, stores=old.stores,
                              store_service=old.store_service)
    except Exception as exc:  # noqa: BLE001 - any failure to build keeps the old pipeline
        raise ReloadError(f"{type(exc).__name__}: {exc}") from None
    if runner.detector_names != old.detector_names or runner.has_ensemble != old.has_ensemble:
        raise ReloadError(
            f"the detector stages {list(runner.detector_names)} (ensemble {runner.has_ensemble}) differ from the "
            f"served ones {list(old.detector_names)} (ensemble {old.has_ensemble}): they name the response's "
            f"outputs; restart to change them"
        )
    if self.warmup_enabled:  # its fused session is new: warm before the swap (proxy/warmup.py)
        try:
            log.info("reload warm-up: %s", describe(self.warm(runner)))
        except Exception as exc:  # noqa: BLE001 - a pipeline that fails on its warm-up batches is not swapped in
            raise ReloadError(f"the new pipeline failed its warm-up: {type(exc).__name__}: {exc}") from None
    auth = self.cfg.server.auth
    try:
        token = read_token(auth.bearer_token_file) if auth.enabled else None
    except OSError as exc:
        raise ReloadError(f"server.auth.bearer_token_file: {exc}") from None
    if auth.enabled and not token:
        raise ReloadError(f"server.auth.bearer_token_file: {auth.bearer_token_file} is empty")
    return cfg, runner, token
