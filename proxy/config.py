"""The proxy's one configuration: a pydantic model loaded from YAML, environment and CLI flags.

Precedence (later wins): built-in defaults < the YAML file < ``ROBUSTGATE_*`` environment
variables < command-line flags (``--bundle``, ``--port``, ``--metrics-port``).

Environment scheme: ``ROBUSTGATE_`` + the dotted key path upper-cased with ``__`` between
levels; the value is parsed as a YAML scalar/flow value (``32`` -> int, ``true`` -> bool,
``[a, b]`` -> list)::

    ROBUSTGATE_SERVER__PORT=9000
    ROBUSTGATE_BATCHING__MAX_BATCH_SIZE=32
    ROBUSTGATE_BACKEND__ONNXRUNTIME__DEVICE=auto
    ROBUSTGATE_PIPELINE__VERDICT_MODE=item
    ROBUSTGATE_BUNDLE=/bundles/default

An unknown nested key (``ROBUSTGATE_SERVR__PORT``) is an error naming the variable; a single-level
name that is no top-level key (``ROBUSTGATE_SKIP_APT`` of scripts/install.sh) is ignored with a
warning.
Every validation error names the bad key as a dotted path (``batching.max_batch_size: ...``).
pydantic-settings would do the environment part, but it is not a declared dependency and its
errors do not say which variable was wrong; the merge below is 20 lines.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# the pipeline section is the one assembly's (proxy and red team build their stages the same way)
from robustgate.defenses.config import STAGE_NAME, PipelineConfig, StageConfig  # noqa: F401
from robustgate.defenses.stateful.remote import STORE_SOCKET_ENV

log = logging.getLogger("robustgate.proxy")
ENV_PREFIX = "ROBUSTGATE_"
# the project's own single-level variables that are no configuration keys, passed over without a
# warning: the workers' store socket (proxy/workers.py), the data cache (models/data.py), the
# scripts' (scripts/install.sh, bench/gpu/check.sh) and the native front's (FRONT_ prefix, deploy/)
PROJECT_ENV = frozenset({STORE_SOCKET_ENV.removeprefix(ENV_PREFIX), "CACHE", "REVISION", "SKIP_APT", "EXTRAS"})
PROJECT_ENV_PREFIXES = ("FRONT_",)


class ConfigError(ValueError):
    """An invalid configuration; the message names the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Strict):
    cert: Path | None = None  # PEM server certificate chain; with `key` enables TLS
    key: Path | None = None
    client_ca: Path | None = None  # PEM CA bundle that client certificates must chain to (mTLS)
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TlsConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key must be given together")
        if self.require_client_cert and self.client_ca is None:
            raise ValueError("tls.require_client_cert needs tls.client_ca")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("tls.client_ca needs tls.cert and tls.key (mTLS runs over TLS)")
        for name in ("cert", "key", "client_ca"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"tls.{name}: file {p} does not exist")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None


def _check_token_file(p: Path, key: str) -> None:
    """A bearer token's file exists and holds something; ValueError naming ``key`` otherwise."""
    if not Path(p).is_file():
        raise ValueError(f"{key}: file {p} does not exist")
    if not Path(p).read_bytes().strip():
        raise ValueError(f"{key}: file {p} is empty")


class AuthConfig(_Strict):
    """Optional bearer-token check on every RPC but the probes (docs/PROTOCOL.md, "Authentication")."""

    bearer_token_file: Path | None = None  # file holding the token (surrounding whitespace ignored); None = no check

    @model_validator(mode="after")
    def _check(self) -> "AuthConfig":
        if self.bearer_token_file is not None:
            _check_token_file(self.bearer_token_file, "auth.bearer_token_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.bearer_token_file is not None


class TrustedConfig(_Strict):
    """Clients trusted with more than the others (docs/OPERATIONS.md, "Trusted clients"): the answers of
    ``outputs.trusted_policy`` and, with ``server.explain``, the detectors' scores and thresholds. A call is
    trusted when its verified client certificate's subject is one of ``subjects`` or its bearer token is
    the one in one of ``token_files``; what a client can claim for itself (a header, its address) never
    makes it trusted."""

    subjects: list[str] = Field(default_factory=list, description=(
        "verified client-certificate subjects, exactly as the call's identity names them (mtls:<subject>, "
        "proxy/identity.py); needs server.tls.require_client_cert"))
    token_files: list[Path] = Field(default_factory=list, description=(
        "files each holding one bearer token (surrounding whitespace ignored); with server.auth these tokens "
        "are accepted as well as its own"))

    @model_validator(mode="after")
    def _check(self) -> "TrustedConfig":
        for i, subject in enumerate(self.subjects):
            if not subject.strip():
                raise ValueError(f"trusted.subjects.{i}: empty subject")
        for i, p in enumerate(self.token_files):
            _check_token_file(p, f"trusted.token_files.{i}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.subjects or self.token_files)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class AdminConfig(_Strict):
    """The admin service ``robustgate.admin.v1.Admin/Reload`` (docs/OPERATIONS.md, "Hot reload" and
    "Threat model"): off unless ``enabled``; when on, it answers only behind the bearer token
    (``server.auth``) or on its own port bound to loopback. A bare ``true``/``false`` (the older
    ``server.admin: true``) means ``enabled``."""

    enabled: bool = False  # serve robustgate.admin.v1.Admin/Reload (hot reload; SIGHUP works without it)
    port: int | None = Field(None, ge=0, le=65535, description=(
        "own port for the admin service (0 = any free port); null = the inference port, which needs server.auth"))
    host: str = Field("127.0.0.1", description=(
        "address the admin port binds; anything but loopback needs server.auth"))

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(8001, ge=0, le=65535)  # 0 = any free port
    metrics_port: int | None = Field(8002, ge=0, le=65535)  # None disables the metrics endpoint
    metrics_host: str = "0.0.0.0"
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # gRPC send and receive limit
    grace_s: float = Field(30.0, ge=0)  # SIGTERM drain: time in-flight requests get to finish
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    identity_header: str | None = Field("x-client-id", pattern=r"^[a-z0-9_.-]+$", description=(
        "the metadata header that names a client that has no client certificate and no bearer token "
        "(proxy/identity.py; docs/OPERATIONS.md 'Client identity'); null = none, the peer address next"))
    admin: AdminConfig = AdminConfig()
    trusted: TrustedConfig = TrustedConfig()
    explain: bool = Field(False, description=(
        "a rejection's status details and trailing metadata carry the detector's score and threshold, and an "
        "answer each detector's score; an evasion oracle, so with server.trusted only trusted clients get them "
        "(without it every client that passes server.auth does)"))
    compute_nice: int = Field(10, ge=0, le=19, description=(
        "niceness added to the threads that compute batches (batch workers, ONNX Runtime's pools), so that the "
        "event loop, which admits, refuses and answers, wins a contended core (proxy/priority.py); 0 = off. With "
        "backend.kind upstream the batch workers, which wait on the network, keep the loop's priority"))
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field("auto", description=(
        "the event loop that runs gRPC and the batcher: uvloop (libuv; grpc.aio's per-call floor costs less CPU on "
        "it: bench/results/hardening.rpc_floor.md), asyncio (the standard library's), or auto = "
        "uvloop where it is installed (a core dependency on Linux and macOS), else asyncio"))
    warmup: bool | None = Field(None, description=(
        "before the port serves, run the pipeline on synthetic batches of 1 and batching.max_batch_size items "
        "(pixels drawn in the bundle's value range; stateful stages see none of them), so that the first clients "
        "meet warm sessions and the queue-wait admission starts from the measured time per item instead of the "
        "first batch's (proxy/warmup.py); again on a hot reload, before the swap; null = on with an in-process "
        "backend, off with an upstream one, whose model server warms itself (Triton's model_warmup)"))
    workers: int | None = Field(None, ge=1, description=(
        "serving processes on the one port, each with its own event loop, batcher and backend sessions "
        "(proxy/workers.py; docs/OPERATIONS.md, 'Workers'); null = the cores the container is given (no more than "
        "its memory holds: 512 MiB plus twice the bundle's files per worker), or 1 when any stage or the backend "
        "runs on a GPU "
        "or per-client limits live in process memory (limits.per_client with store kind memory; a stateful stage's "
        "memory store is the supervisor's, shared by the workers); 1 = one process"))

    @model_validator(mode="after")
    def _admin_guarded(self) -> "ServerConfig":
        a = self.admin
        if a.enabled and not self.auth.enabled:
            if a.port is None:
                raise ValueError(
                    "admin.enabled: the Reload RPC on the inference port needs a bearer token (server.auth."
                    "bearer_token_file); or give it its own loopback port (server.admin.port)")
            if a.host not in LOOPBACK_HOSTS:
                raise ValueError(
                    f"admin.host: {a.host!r} is not loopback ({', '.join(LOOPBACK_HOSTS)}); an admin port reachable "
                    f"from other hosts needs a bearer token (server.auth.bearer_token_file)")
        if self.trusted.subjects and not self.tls.require_client_cert:
            raise ValueError("trusted.subjects: a subject is known only from a verified client certificate, which "
                             "gRPC asks for only with server.tls.require_client_cert: true (and client_ca, cert, key)")
        if a.enabled and a.port is not None and a.port != 0 and a.port in (self.port, self.metrics_port):
            raise ValueError(f"admin.port: {a.port} is already the gRPC or the metrics port")
        return self


class OnnxRuntimeConfig(_Strict):
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    intra_op_threads: int = Field(0, ge=0, description=(  # proxy/serve.py make_backend, proxy/workers.py
        "threads of the backbone's ONNX Runtime pool; 0 = the process's share of the cores the container is given "
        "(the physical ones among them / server.workers, at least 1), set as an explicit count: ONNX Runtime's "
        "own default starts "
        "one thread per physical core of the node, each pinned to its core, whatever the container's CPU limit and "
        "however many workers share those cores"))
    inter_op_threads: int = Field(0, ge=0)
    spinning: bool | Literal["run"] = Field(False, description=(  # proxy/backends/onnx.py SPINNING_CONFIG
        'let idle ONNX Runtime threads busy-wait for work: true (burns CPU between batches), "run" (only while a '
        "batch runs: no wake-up per operator, none between batches)"))


class UpstreamConfig(_Strict):
    """Passed 1:1 as keyword arguments to ``backends.upstream.UpstreamBackend``."""

    url: str = "127.0.0.1:8001"  # host:port of the upstream V2 gRPC server, no scheme
    model_name: str | None = None  # default: the bundle's name
    model_version: str = ""
    timeout_s: float = Field(10.0, gt=0)  # per infer, retries included, when the client set no shorter deadline
    retries: int = Field(2, ge=0)  # extra attempts on UNAVAILABLE
    backoff_s: float = Field(0.05, ge=0)
    health_interval_s: float = Field(1.0, gt=0)
    max_batch_items: int | None = Field(None, ge=1, description=(
        "items per upstream request: a larger batch goes as several requests at once; null = the max_batch_size "
        "of the upstream's Triton ModelConfig where it serves one, else no bound"))
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "bytes per upstream request (4 KiB of it for the fields around the pixels): a larger batch goes as "
        "several requests at once; the default is the receive limit of a gRPC server that did not raise it "
        "(MLServer, KServe)"))
    tls_ca: str | None = None  # PEM CA of the upstream's certificate (switches the channel to TLS)
    tls_cert: str | None = None  # PEM client certificate + key for mutual TLS
    tls_key: str | None = None


class TorchBackendConfig(_Strict):
    """``backend.kind: torch``: the bundle's torch twin in-process (proxy/backends/torch.py)."""

    device: Literal["cpu", "cuda", "auto"] | None = None  # None: pipeline.device


class BackendConfig(_Strict):
    kind: Literal["onnxruntime", "torch", "upstream"] = "onnxruntime"
    # compute precision of an in-process torch backbone (kind torch, or onnxruntime's fallback to
    # the twin on cuda): autocast to bf16/fp16; the accuracy cost: bench/results/gpu.precision*.md
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    onnxruntime: OnnxRuntimeConfig = OnnxRuntimeConfig()
    torch: TorchBackendConfig = TorchBackendConfig()
    upstream: UpstreamConfig = UpstreamConfig()


class BatchingConfig(_Strict):
    enabled: bool = True
    max_batch_size: int = Field(32, ge=1)  # items per executed batch (a larger request runs alone)
    max_queue_delay_ms: float = Field(2.0, ge=0)  # how long the first waiting request waits for company
    max_queue_items: int = Field(1024, ge=1)  # items waiting; beyond -> RESOURCE_EXHAUSTED
    max_queue_wait_ms: float | None = Field(None, gt=0, description=(
        "wait budget: a request is refused (RESOURCE_EXHAUSTED) when the items already waiting would take "
        "longer than this to work off at the recent service time per item; null = off (only max_queue_items "
        "bounds the queue); deploy/default.yaml sets 100"))
    workers: int | None = Field(None, ge=1)  # batches running at once; None: 1 (onnxruntime), 4 (upstream)
    # Measured (bench/results/defenses.md): with ONNX Runtime on 1 intra-op thread JPEG's cost fell from
    # 10.3% to -1.5%; with its default 2 threads on 2 cores it saved nothing (14.4% -> 15.6%) and cost
    # bit depth 6 points (purify.proxy_cost_overlap*). Hence off.
    overlap_front: bool = Field(False, description=(
        "for a pipeline with purifiers: the next batch's detectors and purifiers run in a thread of their own "
        "while the current batch classifies (proxy/batcher.py, 'Front halves'); pays only when the classify pass "
        "leaves a core idle (ONNX Runtime on one intra-op thread; an upstream backend's network wait)"))

    def resolved_workers(self, backend_kind: str) -> int:
        # onnxruntime: one batch at a time. Two in flight give +15-20% items/s at batch 64
        # (bench/results/detect.proxy_cost_workers, purify.proxy_cost_workers2) but under an overload
        # of small requests the second worker's Python work contends for the GIL with the event loop:
        # refusal p99 1.2 s instead of 0.11 s at 1,500 requests/s (hardening.overload_workers2)
        return self.workers if self.workers is not None else (4 if backend_kind == "upstream" else 1)


class LimitsStoreConfig(_Strict):
    """Where the per-client limits' state lives (proxy/ratelimit.py): ``memory``, this process (the
    default), or ``redis``, one state for every worker and replica that names the same server."""

    kind: Literal["memory", "redis"] = "memory"  # memory: this process; redis: every worker and replica naming the server
    url: str | None = None  # redis: redis://host:port/db (rediss:// for TLS, unix:///path.sock)
    prefix: str = Field("robustgate:limits", min_length=1)  # the keys' namespace (one per model and policy)
    timeout_ms: float = Field(250.0, gt=0)  # one round trip's limit (connect and answer)
    # a call whose limits cannot be read (Redis down or slow): refused UNAVAILABLE (fail-closed), or
    # admitted unlimited (fail-open); counted in robustgate_limit_store_errors_total either way
    on_error: Literal["fail-closed", "fail-open"] = "fail-closed"  # Redis unreachable: refuse UNAVAILABLE, or admit

    @model_validator(mode="after")
    def _url(self) -> "LimitsStoreConfig":
        if self.kind == "redis" and not (self.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url: kind redis needs a redis://, rediss:// or unix:// URL, got {self.url!r}")
        if self.kind == "memory" and self.url is not None:
            raise ValueError("url: only kind redis reads a URL")
        return self


class ClientLimitsConfig(_Strict):
    """Per-client query limits keyed on the client identity (proxy/ratelimit.py); counted in items,
    per process unless ``store.kind`` is redis. Both off by default."""

    rate_per_s: float | None = Field(None, gt=0)  # token bucket refill, queries per second; null = no rate limit
    burst: int | None = Field(None, ge=1)  # bucket size; default: ceil(rate_per_s)
    budget: int | None = Field(None, ge=1)  # queries per client per window; null = no budget
    window_s: float = Field(86400.0, gt=0)  # the budget's window (a day)
    max_clients: int = Field(100_000, ge=1)  # memory: clients remembered (least recently seen forgotten first)
    store: LimitsStoreConfig = LimitsStoreConfig()  # memory (per process) or redis (shared)


class LimitsConfig(_Strict):
    max_batch_items: int = Field(256, ge=1)  # items in one ModelInfer; beyond -> INVALID_ARGUMENT
    per_client: ClientLimitsConfig = ClientLimitsConfig()


OutputPolicy = Literal["logits", "top_k", "label", "aaa"]


class OutputsConfig(_Strict):
    """What an accepted item's answer tells the client (proxy/outputs.py; docs/PROTOCOL.md "Output policies")."""

    policy: OutputPolicy = "logits"  # logits = the model's, as before
    k: int = Field(1, ge=1)  # top_k: probabilities kept
    decimals: int = Field(2, ge=0, le=8)  # top_k: rounding
    tau: float = Field(0.5, gt=0)  # aaa: interval width of the margin
    alpha: float = Field(0.9, gt=0, lt=1)  # aaa: reflection strength
    temperature: float = Field(1.0, gt=0)  # aaa: calibration temperature kept
    trusted_policy: OutputPolicy | None = Field(None, description=(
        "the policy of the clients server.trusted names (with the parameters above); null = policy, as everyone's"))


class ProxyConfig(_Strict):
    bundle: Path | None = None
    model_name: str | None = None  # served model name; default: the bundle's name
    server: ServerConfig = ServerConfig()
    backend: BackendConfig = BackendConfig()
    batching: BatchingConfig = BatchingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    limits: LimitsConfig = LimitsConfig()
    outputs: OutputsConfig = OutputsConfig()

    @model_validator(mode="after")
    def _fits(self) -> "ProxyConfig":
        if self.outputs.trusted_policy is not None and not self.server.trusted.enabled:
            raise ValueError("outputs.trusted_policy: no client is trusted; name them in server.trusted (subjects, "
                             "token_files)")
        if self.batching.max_queue_items < self.limits.max_batch_items:
            raise ValueError(
                f"batching.max_queue_items ({self.batching.max_queue_items}) must be >= limits.max_batch_items "
                f"({self.limits.max_batch_items}), or the largest allowed request could never be queued"
            )
        return self


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``ROBUSTGATE_A__B=v`` -> ``({"a": {"b": v}}, {("a", "b"): "ROBUSTGATE_A__B"})``."""
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX:
            continue
        path = tuple(part.lower() for part in var[len(ENV_PREFIX):].split("__"))
        if len(path) == 1 and path[0] not in ProxyConfig.model_fields:
            # single-level names that are not config keys: the project's own (PROJECT_ENV), or a typo
            name = var[len(ENV_PREFIX):]
            if name not in PROJECT_ENV and not name.startswith(PROJECT_ENV_PREFIXES):
                log.warning("ignoring environment variable %s: not a configuration key", var)
            continue
        if any(not p for p in path):
            raise ConfigError(f"environment variable {var}: empty key segment (use __ between levels)")
        try:
            value = yaml.safe_load(environ[var]) if environ[var] != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {var}: not a valid value: {exc}") from exc
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {var}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
        sources[path] = var
    return tree, sources


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _describe(exc: ValidationError, sources: dict[tuple[str, ...], str], origin: str) -> str:
    parts = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "config"
        # the variable that set this key, a parent of it, or (unknown section) a key below it
        var = next((v for path, v in sources.items() if path[: len(loc)] == loc or loc[: len(path)] == path), None)
        where = f" (from environment variable {var})" if var else ""
        msg = re.sub(r"^Value error, ", "", err["msg"])
        parts.append(f"{key}: {msg}{where}")
    return f"invalid configuration{origin}: " + "; ".join(parts)


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ProxyConfig:
    """Builds the config from ``path`` (YAML, optional), ``environ`` (default ``os.environ``) and
    ``overrides`` (nested dict from CLI flags). Raises :class:`ConfigError` naming the bad key."""
    data: dict[str, Any] = {}
    origin = ""
    if path is not None:
        path = Path(path)
        origin = f" in {path}"
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded
    env, sources = env_overrides(os.environ if environ is None else environ)
    data = _merge(data, env)
    data = _merge(data, overrides or {})
    try:
        cfg = ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, origin)) from None
    if cfg.bundle is None:
        raise ConfigError(f"invalid configuration{origin}: bundle: required (a bundle directory; --bundle DIR)")
    return cfg
