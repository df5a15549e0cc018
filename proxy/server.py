"""The gRPC server: Open Inference Protocol v2 in front of the defense pipeline.

``ProxyServer`` wires the codec, the batcher (which runs the pipeline in a worker thread), the
Prometheus metrics, the grpc.health.v1 health service and server reflection into one grpc.aio
server. The transport only decodes, queues, applies the verdict rules (proxy/verdicts.py: request
and item modes, the rejection status -- without the detector's score and threshold unless
``server.explain``) and encodes.

Before its port serves, it runs the pipeline on synthetic batches (``server.warmup``, proxy/warmup.py).
Bad input never crashes it: every error path answers a status with a message, bytes that are not
a valid protobuf message included (INVALID_ARGUMENT). Overload: the batcher's admission (its item
bound and wait budget, proxy/batcher.py) is asked before a request's payload is decoded, so that a
refusal (RESOURCE_EXHAUSTED) costs the event loop next to nothing beyond the gRPC call itself.
Draining (SIGTERM) turns health NOT_SERVING, stops accepting RPCs, lets in-flight ones finish
within the grace. ``reload()`` (SIGHUP or the ``robustgate.admin.v1.Admin/Reload`` RPC, served only
when ``server.admin`` enables it: behind the token or on its own loopback port; proxy/reload.py)
swaps in a re-read pipeline without dropping requests. An optional bearer token (``server.auth``) guards
every RPC but the probes.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from dataclasses import replace
from typing import Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from google.protobuf import descriptor_pool, empty_pb2, struct_pb2
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection, reflection_pb2

from robustgate import __version__
from robustgate.defenses.pipeline import PipelineResult
from robustgate.defenses.assemble import PipelineRunner
from robustgate.models.client_values import ClientValues
from robustgate.models.output_kind import reads_probabilities
from robustgate.proxy.backends.base import Backend, BackendError, ModelMeta, TensorMeta
from robustgate.proxy.batcher import Batcher, BatcherClosed, DeadlineExpired, QueueFull
from robustgate.proxy.codec import (
    RADIUS_OUTPUT, SCORE_PREFIX, VERDICT_OUTPUT, VERDICT_NAMES, Answer, InputContract, ProtocolError,
    check_model, decode_infer, encode_infer_bytes,
)
from robustgate.proxy.config import ProxyConfig
from robustgate.proxy.metrics import Metrics
from robustgate.proxy.reload import ReloadError, prepare_reload, read_token, reload
from robustgate.proxy.triton_compat import model_config_handler
from robustgate.proxy import warmup
from robustgate.proxy.priority import call_at_priority
from robustgate.proxy.identity import Trust, call_identity
from robustgate.proxy.ratelimit import LimitStoreError, build_limiter
from robustgate.proxy.verdicts import (  # noqa: F401
    _OUTCOME_BY_CODE, BatchAnswer, _Failure, apply_outputs, blocked, limited, outcome, rejection, verdict_answer,
)
from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"
# grpc.health.v1 service that is SERVING whenever the process answers (Kubernetes liveness): unlike
# "" and SERVICE_NAME it does not follow the upstream, so a dead model server takes the pod out of
# the Service (readiness) without restarting the proxy in a loop.
LIVENESS_SERVICE = "liveness"
ADMIN_SERVICE = "robustgate.admin.v1.Admin"
# RPCs answered without a bearer token: the probes (Kubernetes' gRPC probes cannot send headers)
AUTH_EXEMPT = (f"/{SERVICE_NAME}/ServerLive", f"/{SERVICE_NAME}/ServerReady", "/grpc.health.v1.Health/")
log = logging.getLogger("robustgate.proxy")
# A client's own deadline passes before the server's copy of it (the server's started when the
# request arrived: transit and event-loop lag later), and its cancellation then reaches the handler
# just before the server-side deadline. A cancellation this close to the deadline counts as one.
DEADLINE_SLACK_S = 0.1

def bundle_metadata(bundle) -> ModelMeta:
    """The model's metadata as the bundle declares it."""
    inp = bundle.input
    return ModelMeta(
        name=bundle.name, versions=("1",), platform="onnxruntime_onnx",
        inputs=(TensorMeta(inp.name, "FP32", (-1, *inp.shape)),),
        outputs=(TensorMeta(bundle.spec.backbone.logits_output, "FP32", (-1, len(bundle.classes))),),
    )


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors reflection serves: our OIP stubs live in a private pool (see
    protos/generate.py), so the health and reflection files are added beside them."""
    pool = descriptor_pool.DescriptorPool()
    for fd in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(fd.serialized_pb)
    return pool


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses every RPC but the probes (AUTH_EXEMPT) with UNAUTHENTICATED unless its metadata holds
    ``authorization: Bearer <token>``. ``token()`` is read per call (a reload may rotate it); the
    comparison is constant-time (hmac.compare_digest). ``trust``: the trusted clients' tokens
    (server.trusted.token_files) are accepted too."""

    def __init__(self, token: Callable[[], bytes | None], on_failure: Callable[[], None], trust: Trust = Trust()):
        self.token = token
        self.on_failure = on_failure
        self.trust = trust

    async def intercept_service(self, continuation, details):
        expected = self.token()
        if expected is None or details.method.startswith(AUTH_EXEMPT):
            return await continuation(details)
        got = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                break
        scheme, _, token = got.partition(b" ")
        if scheme.lower() == b"bearer" and (hmac.compare_digest(token.strip(), expected)
                                            or (self.trust.tokens and self.trust.token(token.strip()))):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: UNIMPLEMENTED as usual
            return None
        self.on_failure()
        message = "missing bearer token (metadata authorization: Bearer <token>)" if not got else "invalid bearer token"
        return _deny(handler, message)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


_RPC_TYPES = {  # method -> (request, response) message classes of the Open Inference Protocol service
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def add_inference_service(servicer: "InferenceServicer", server: grpc.aio.Server) -> None:
    """Registers the OIP service like the generated ``add_GRPCInferenceServiceServicer_to_server``,
    except that requests arrive as bytes and are parsed here: bytes that are no valid message answer
    INVALID_ARGUMENT naming the message type (grpc's own deserializer failure answers UNKNOWN)."""

    def parsing(name: str, request_type):
        behavior = getattr(servicer, name)

        async def handler(raw: bytes, context):
            try:
                request = request_type.FromString(raw)
            except DecodeError as exc:
                servicer.undecodable(name)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid {request_type.DESCRIPTOR.full_name} message: {exc}")
            return await behavior(request, context)

        return handler

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(parsing(name, req), response_serializer=_serialize)
        for name, (req, resp) in _RPC_TYPES.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _serialize(response) -> bytes:
    """A response message, or one serialized already (ModelInfer's answers: codec.encode_infer_bytes)."""
    return response if type(response) is bytes else response.SerializeToString()


def admin_handler(proxy: "ProxyServer") -> grpc.GenericRpcHandler:
    """``robustgate.admin.v1.Admin/Reload`` (google.protobuf.Empty -> google.protobuf.Struct): the
    hot reload of ProxyServer.reload; a refused reload answers FAILED_PRECONDITION with the reason."""

    async def reload(request, context):
        try:
            summary = await proxy.reload()
        except ReloadError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"reload refused, the running pipeline is kept: {exc}")
        if proxy.after_admin_reload is not None:  # the other worker processes reload too (proxy/workers.py)
            proxy.after_admin_reload()
        out = struct_pb2.Struct()
        out.update(summary)
        return out

    handler = grpc.unary_unary_rpc_method_handler(
        reload, request_deserializer=empty_pb2.Empty.FromString, response_serializer=struct_pb2.Struct.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(ADMIN_SERVICE, {"Reload": handler})


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, proxy: "ProxyServer"):
        self.p = proxy

    def undecodable(self, method: str) -> None:
        if method == "ModelInfer":
            self.p.metrics.requests.labels(outcome="invalid").inc()

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.p.is_ready())

    async def ModelReady(self, request, context):
        try:
            check_model(request.name, request.version, self.p.contract)
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.p.is_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="robustgate", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            check_model(request.name, request.version, self.p.contract)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.message)
        return self.p.model_metadata(self.p.trust.call(context))

    async def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        p = self.p  # the caller's identity only where a per-client limit or a stateful stage reads it
        client = (call_identity(context, p.cfg.server.identity_header)
                  if p.limiter.enabled or p.runner.stateful_names else None)
        failure, response = await p.infer(request, context.time_remaining(), client, p.trust.call(context))
        m = self.p.metrics
        m.request_duration.observe(time.perf_counter() - t0)
        if failure is not None:
            m.outcome_counter(failure.outcome).inc()
            if failure.metadata:
                context.set_trailing_metadata(failure.metadata)
            await context.abort(failure.code, failure.message)
        return response


def freeze_gc_heap() -> None:
    """Moves every object alive now (torch, ONNX Runtime, the bundle: ~490k objects) out of the
    cyclic garbage collector's reach. Under load the collector's full passes over that heap took
    ~235 ms each, stopping the event loop: the p99 of even a refusal was a GC pause
    (bench/results/hardening.overload*.md). Objects made afterwards are collected as before."""
    gc.collect()
    gc.freeze()


class ProxyServer:
    """One proxy instance. ``await start()`` binds and serves; ``await stop(grace)`` drains."""

    def __init__(self, cfg: ProxyConfig, bundle, backend: Backend, runner: PipelineRunner, revision: str = "unknown",
                 config_loader: Callable[[], ProxyConfig] | None = None, freeze_heap: bool = False):
        self.cfg = cfg
        self.freeze_heap = freeze_heap  # freeze_gc_heap() after start and reload; the CLI's server sets it
        self.config_loader = config_loader  # re-reads the config for a hot reload (None: reload refused)
        self.bundle = bundle
        # the backbone's output holds probabilities: the backend gives their logarithms, the answer
        # turns them back (models/output_kind.py)
        self.probabilities = reads_probabilities(bundle)
        self.backend = backend
        self.runner = runner
        try:
            meta = backend.metadata()
        except BackendError as exc:  # upstream down at start: serve the bundle's view, readiness says the rest
            log.warning("backend metadata unavailable (%s); using the bundle's", exc)
            meta = bundle_metadata(bundle)
        self.meta = meta
        self.contract = InputContract(
            model_name=cfg.model_name or bundle.name,
            versions=tuple(meta.versions) or ("1",),
            input_name=bundle.input.name,
            item_shape=tuple(bundle.input.shape),
            channels_last=bundle.input.layout == "NHWC",
            client_values=ClientValues.of(bundle.input),
            value_range=tuple(bundle.input.value_range),
            max_batch_items=cfg.limits.max_batch_items,
            logits_output=bundle.spec.backbone.logits_output,
            # detector scores are an oracle for evading the detector: answered only with server.explain,
            # and with server.trusted only to trusted clients (trusted_contract)
            detector_stages=runner.detector_names if cfg.server.explain and not cfg.server.trusted.enabled else (),
            has_ensemble=runner.has_ensemble,
        )
        self.trust = Trust.of(cfg.server.trusted.subjects, cfg.server.trusted.token_files)
        self.trusted_contract = self.contract if not self.trust.enabled else replace(
            self.contract, detector_stages=runner.detector_names if cfg.server.explain else ())
        self.metrics = Metrics(
            version=__version__, bundle=bundle.name, revision=revision,
            stages=tuple(stage.name for stage in runner.stages),
        )
        b = cfg.batching
        self.batcher = Batcher(
            run=self._run_batch, enabled=b.enabled, max_batch_size=b.max_batch_size,
            max_queue_delay_s=b.max_queue_delay_ms / 1000.0, max_queue_items=b.max_queue_items,
            max_queue_wait_s=None if b.max_queue_wait_ms is None else b.max_queue_wait_ms / 1000.0,
            on_batch=self._on_batch, workers=b.resolved_workers(cfg.backend.kind),
            # an upstream backend's batch workers wait on the network: at a lower priority each of their
            # wake-ups would queue behind every other process on the cores (the upstream's included), a
            # latency the loop gains nothing from; local sessions' pools keep compute_nice (proxy/serve.py)
            thread_nice=0 if cfg.backend.kind == "upstream" else cfg.server.compute_nice,
            front=self._front_half if b.overlap_front else None,
            rows=_share,
        )
        self.metrics.watch_queue(lambda: self.batcher.depth)
        self.metrics.watch_stateful(runner.stateful_names)
        self.metrics.watch_stores(lambda: {name: store for name, (_, store) in self.runner.stores.items()})
        self.limiter = build_limiter(cfg.limits.per_client)  # in this process, or shared in Redis
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.admin_server: grpc.aio.Server | None = None  # the admin service's own server (server.admin.port)
        self.admin_port: int | None = None
        self.draining = False
        self._health_task: asyncio.Task | None = None
        self._token = read_token(cfg.server.auth.bearer_token_file) if cfg.server.auth.enabled else None
        self._reload_lock: asyncio.Lock | None = None
        self.reuse_port = False  # one of several worker processes on the port (proxy/workers.py)
        self.after_admin_reload: Callable[[], None] | None = None  # workers: relays an RPC reload to the others

    # ---- lifecycle -------------------------------------------------------------------------
    def _credentials(self) -> grpc.ServerCredentials | None:
        tls = self.cfg.server.tls
        if not tls.enabled:
            return None
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
        return grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=ca, require_client_auth=tls.require_client_cert,
        )

    async def start(self) -> int:
        """Binds the gRPC port and the metrics port; returns the bound gRPC port."""
        s = self.cfg.server
        limit = s.max_message_bytes
        # the token check only where a token is configured: a reload re-reads the token file but
        # cannot turn server.auth on (server settings need a restart), and an interceptor costs
        # every call an extra coroutine
        auth = BearerAuth(lambda: self._token, self.metrics.auth_failures.inc, self.trust) if s.auth.enabled else None
        self.server = grpc.aio.server(interceptors=[auth] if auth else None, options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            # a second server on a taken port fails instead of sharing it -- unless this is one of
            # server.workers processes sharing the port (proxy/workers.py sets reuse_port)
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
        ])
        self._reload_lock = asyncio.Lock()
        add_inference_service(InferenceServicer(self), self.server)
        if s.admin.enabled and s.admin.port is None:  # on the inference port: config validation demands the token
            self.server.add_generic_rpc_handlers((admin_handler(self),))
        compat = model_config_handler(self)  # Triton's ModelConfig, for perf_analyzer
        if compat is not None:
            self.server.add_generic_rpc_handlers((compat,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server, pool=reflection_pool(),
        )
        address = f"{s.host}:{s.port}"
        creds = self._credentials()
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
            raise OSError(f"cannot bind the gRPC port {address}: {exc}") from exc
        if not self.port:
            raise OSError(f"cannot bind the gRPC port {address}")
        if s.admin.enabled and s.admin.port is not None:
            self.admin_port = await self._start_admin(auth, creds)
        if self.warmup_enabled:  # before the port serves: the first clients meet a warm pipeline
            await self._warm_up()
        self.batcher.start()
        await self.server.start()
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve(s.metrics_port, s.metrics_host)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._update_health()
        self._health_task = asyncio.get_running_loop().create_task(self._watch_health())
        if self.freeze_heap:
            freeze_gc_heap()
        log.info("robustgate serving %s on port %d (metrics %s, admin %s)", self.contract.model_name, self.port,
                 self.metrics_port, "off" if not s.admin.enabled else self.admin_port or "on the gRPC port")
        if s.explain and not s.auth.enabled and not self.trust.enabled:
            log.warning("server.explain is on without server.auth: every client sees the detectors' scores and "
                        "thresholds in rejections (docs/OPERATIONS.md, 'Threat model')")
        return self.port

    @property
    def warmup_enabled(self) -> bool:
        """``server.warmup``; null: on unless the backend is an upstream model server (proxy/warmup.py)."""
        w = self.cfg.server.warmup
        return w if w is not None else self.cfg.backend.kind != "upstream"

    def warm(self, runner: PipelineRunner) -> list[tuple[int, float]]:
        """proxy/warmup.py's warm-up of ``runner`` with this server's input and batch shapes (blocking)."""
        b = self.cfg.batching
        return warmup.warm_up(runner, self.contract.item_shape, self.contract.value_range,
                              warmup.batch_sizes(b.enabled, b.max_batch_size))

    async def _warm_up(self) -> None:
        """The served pipeline warmed at the batch workers' priority (their sessions' pools run at it),
        and the batcher's admission seeded with its largest batch's time (proxy/warmup.py)."""
        try:
            timings = await asyncio.get_running_loop().run_in_executor(
                None, call_at_priority, self.cfg.server.compute_nice, self.warm, self.runner)
        except Exception as exc:  # noqa: BLE001 - the clients' batches will meet (and report) the same failure
            log.warning("warm-up failed, serving without it: %s: %s", type(exc).__name__, exc)
            return
        log.info("warm-up: %s", warmup.describe(timings))
        items, seconds = timings[-1]
        if seconds > 0:  # a clock that did not move says nothing of the service time
            self.batcher.prime(items, seconds)

    async def _start_admin(self, auth: "BearerAuth | None", creds: grpc.ServerCredentials | None) -> int:
        """The admin service on its own port (server.admin.port, bound to server.admin.host: loopback
        unless the token guards it); the same token check and TLS as the inference port."""
        a = self.cfg.server.admin
        self.admin_server = grpc.aio.server(interceptors=[auth] if auth else None, options=[("grpc.so_reuseport", 0)])
        self.admin_server.add_generic_rpc_handlers((admin_handler(self),))
        address = f"{a.host}:{a.port}"
        try:
            port = self.admin_server.add_secure_port(address, creds) if creds else self.admin_server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the admin port {address}: {exc}") from exc
        if not port:
            raise OSError(f"cannot bind the admin port {address}")
        await self.admin_server.start()
        return port

    def is_ready(self) -> bool:
        return not self.draining and self.backend.ready()

    async def _update_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.is_ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _watch_health(self) -> None:
        interval = self.cfg.backend.upstream.health_interval_s if self.cfg.backend.kind == "upstream" else 1.0
        while not self.draining:
            await asyncio.sleep(interval)
            if not self.draining:
                await self._update_health()
                self.metrics.refresh()  # multiprocess mode: the queue depth for the supervisor's scrape

    async def begin_drain(self) -> None:
        """First step of the drain: ServerReady false, health NOT_SERVING for good."""
        self.draining = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful drain: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within
        ``grace`` seconds (default server.grace_s), then release everything."""
        grace = self.cfg.server.grace_s if grace is None else grace
        await self.begin_drain()
        if self.server is not None:
            await self.server.stop(grace)
        if self.admin_server is not None:
            await self.admin_server.stop(0)
        await self.batcher.stop()
        await self.limiter.aclose()
        self.metrics.close()
        self.backend.close()

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    # ---- hot reload ------------------------------------------------------------------------
    def _run_batch(self, x: np.ndarray, timeout: float | None, clients: list[str] | None = None) -> BatchAnswer:
        """The batcher's ``run`` (in its worker thread): the current runner, read once per batch (a
        reload swaps it), its result as numpy for the requests' answers."""
        return BatchAnswer.of(self.runner(x, timeout, clients=clients))

    def _front_half(self):
        """The batcher's ``front``: the current runner's ``prepare`` when it has purifiers, else None."""
        runner = self.runner
        if not runner.has_purifiers:
            return None

        def prepare(x: np.ndarray, **named):
            finish = runner.prepare(x, **named)
            return lambda timeout: BatchAnswer.of(finish(timeout))

        return prepare

    async def reload(self) -> dict:
        """Swaps in a re-read pipeline without dropping requests (proxy/reload.py ``reload``)."""
        return await reload(self)

    def _prepare_reload(self) -> tuple[ProxyConfig, PipelineRunner, bytes | None]:
        """Everything that can fail, off the event loop (proxy/reload.py ``prepare_reload``)."""
        return prepare_reload(self)

    def pipeline_summary(self) -> dict:
        stages = self.runner.stages
        return {
            "thresholds": {s.name: float(s.defense.threshold) for s in stages if getattr(s.defense, "threshold", None) is not None},
            "actions": {s.name: s.action for s in stages},
            "failure_policy": self.runner.failure_policy,
            "verdict_mode": self.cfg.pipeline.verdict_mode,
        }

    # ---- inference -------------------------------------------------------------------------
    def model_metadata(self, trusted: bool = False) -> pb.ModelMetadataResponse:
        """The served model's metadata; a trusted caller's (server.trusted) declares what it is answered."""
        c = self.trusted_contract if trusted else self.contract
        resp = pb.ModelMetadataResponse(name=c.model_name, versions=list(c.versions), platform=self.meta.platform)
        resp.inputs.add(name=c.input_name, datatype="FP32", shape=[-1, *c.wire_shape])  # as clients send it
        logits = next((o for o in self.meta.outputs if o.name == c.logits_output), None)
        k = logits.shape[-1] if logits is not None else len(self.bundle.classes)
        resp.outputs.add(name=c.logits_output, datatype="FP32", shape=[-1, k])
        resp.outputs.add(name=VERDICT_OUTPUT, datatype="INT32", shape=[-1])
        for stage in c.detector_stages:
            resp.outputs.add(name=SCORE_PREFIX + stage, datatype="FP32", shape=[-1])
        if c.has_ensemble:
            resp.outputs.add(name=RADIUS_OUTPUT, datatype="FP32", shape=[-1])
        return resp

    def _on_batch(self, n: int, batch: BatchAnswer) -> None:
        m = self.metrics
        m.batch_size.observe(n)
        result = batch.result
        for stage, seconds in result.seconds.items():
            m.stage_child(stage).observe(seconds)
        for stage, scores in batch.scores.items():
            m.detector_score.observe_many(stage, scores)
        for stage in result.failed_stages:
            m.stage_failures.labels(stage=stage, policy=self.runner.failure_policy).inc()
        for stage in self.runner.stateful_names:
            if stage in result.seconds:
                m.stateful_child(stage).observe(result.seconds[stage])
            t = result.thresholds.get(stage)
            if t is not None and stage in result.scores:
                # the batch's numpy scores: a tensor call would release and retake the GIL on the event loop
                hits = int(np.count_nonzero(batch.scores[stage] > t))
                if hits:
                    m.stateful_detections.labels(stage=stage).inc(hits)

    async def infer(self, request: pb.ModelInferRequest, time_remaining: float | None, client: str | None = None,
                    trusted: bool = False):
        """-> (failure, None) or (None, response). Never raises for a bad request. ``client``: the
        caller's identity (proxy/identity.py) for its limits and the stateful stages; ``trusted``: the
        caller is a trusted client (server.trusted: outputs.trusted_policy's answers, explain's scores)."""
        m = self.metrics
        try:
            refused = self.batcher.admission(1)  # refusing even 1 item: refuse before paying for the decode
            if refused is not None:
                raise QueueFull(refused)
            t0 = time.perf_counter()
            decoded = decode_infer(request, self.trusted_contract if trusted else self.contract)
            m.decode_duration.observe(time.perf_counter() - t0)
            if client is not None and self.limiter.enabled:
                n = int(decoded.x.shape[0])
                if self.limiter.remote:
                    try:
                        refusal, first = await self.limiter.acheck(client, n)
                    except LimitStoreError as exc:
                        m.limit_store_errors.inc()
                        log.warning("client limits unavailable (%s): %s", "admitted" if self.limiter.fail_open else
                                    "refused", exc)
                        if not self.limiter.fail_open:
                            return _Failure(grpc.StatusCode.UNAVAILABLE, "client limits unavailable; retry later",
                                            "unavailable"), None
                        refusal, first = None, False
                else:
                    refusal, first = self.limiter.check(client, n)
                if refusal is not None:
                    m.queries_refused.labels(reason=refusal.reason).inc(n)
                    if first:
                        m.clients_blocked.labels(reason=refusal.reason).inc()
                        log.info("client %s refused (%s): %s", client, refusal.reason, refusal.message)
                    return limited(refusal.message, refusal.retry_after_s), None
            deadline = None if time_remaining is None else time.monotonic() + time_remaining
            try:
                share, queued = await self.batcher.submit(decoded.x, deadline, client)
            except asyncio.CancelledError:  # grpc cancels the handler when the client's deadline passes
                if deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S:
                    m.requests.labels(outcome="deadline_exceeded").inc()
                raise
            m.queue_duration.observe(queued)
            return self._respond(request, decoded, share, client, trusted)
        except ProtocolError as exc:
            return _Failure(grpc.StatusCode[exc.code], exc.message, _OUTCOME_BY_CODE.get(exc.code, "invalid")), None
        except QueueFull as exc:
            return _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "resource_exhausted"), None
        except DeadlineExpired as exc:
            return _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), "deadline_exceeded"), None
        except BatcherClosed as exc:
            return _Failure(grpc.StatusCode.UNAVAILABLE, str(exc), "unavailable"), None
        except BackendError as exc:
            m.upstream_errors.labels(code=exc.code).inc()
            code = grpc.StatusCode[exc.code] if exc.code in grpc.StatusCode.__members__ else grpc.StatusCode.INTERNAL
            outcome = "deadline_exceeded" if exc.code == "DEADLINE_EXCEEDED" else "upstream_error"
            return _Failure(code, f"backend: {exc}", outcome), None
        except Exception as exc:  # noqa: BLE001 - any other failure answers INTERNAL and the server goes on
            log.exception("ModelInfer failed")
            return _Failure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", "internal"), None

    def _count_block(self, result: PipelineResult, client: str | None) -> None:
        """Counts a blocked client's refused items, and the client as newly blocked when one of its
        items scored over the threshold in this request (the query that set the block; a blocked
        client's later queries are not observed, so they score 0)."""
        stage = next(result.reason[i] for i, e in enumerate(result.blocked) if e is not None) or "unknown"
        self.metrics.queries_refused.labels(reason=stage).inc(len(result.blocked))
        t, s = result.thresholds.get(stage), result.scores.get(stage)
        if t is not None and s is not None and bool((s > t).any()):
            self.metrics.clients_blocked.labels(reason=stage).inc()
            log.info("client %s refused (%s): blocked by the stateful stage", client, stage)

    def _respond(self, request: pb.ModelInferRequest, decoded, share: "Share", client: str | None = None,
                 trusted: bool = False):
        """Verdict semantics (proxy/verdicts.py) and encoding of one request's share of a batch:
        ``share`` = (the batch, its first row, its end row); ``trusted``: as :meth:`infer`'s."""
        t2 = time.perf_counter()
        batch, a, b = share
        if batch.any_blocked:
            rows = batch.rows(a, b)
            refused = blocked(rows, time.time())
            if refused is not None:
                self._count_block(rows, client)
                return refused, None
        explain = self.cfg.server.explain and (trusted or not self.trust.enabled)
        failure, answer = verdict_answer(batch, a, b, self.cfg.pipeline.verdict_mode, self.metrics, explain)
        if failure is not None:
            return failure, None
        outputs = self.cfg.outputs
        answer.logits = apply_outputs(answer.logits, outputs, self.probabilities,
                                      outputs.trusted_policy if trusted else None)
        contract = self.trusted_contract if trusted else self.contract
        version = request.model_version or contract.versions[0]
        response = encode_infer_bytes(decoded, answer, contract, version)
        m = self.metrics
        m.encode_duration.observe(time.perf_counter() - t2)
        m.outcome_counter(VERDICT_NAMES[max(batch.codes[a:b])]).inc()  # verdicts.outcome: the worst verdict
        return None, response


Share = tuple[BatchAnswer, int, int]  # a request's rows [a, b) of its batch's answer


def _share(batch: BatchAnswer, a: int, b: int) -> Share:
    """The batcher's ``rows``: a request's share of its batch, without copying anything."""
    return batch, a, b
