"""Upstream backend: the proxy's classify step forwarded to an Open Inference Protocol (KServe V2)
gRPC server -- Triton, KServe, Seldon MLServer -- over one pooled channel.

What it guarantees (DESIGN.md, "Serving behaviour"):

- one ``grpc.Channel`` for the process (HTTP/2 multiplexes every call; the sync stubs are
  thread-safe, so the pipeline's worker threads share it), with keepalive pings and a short
  reconnect backoff so that an upstream that comes back is used again within about a second;
- the client's deadline propagates: each call's timeout is ``min(timeout_s, timeout)`` where
  ``timeout`` is what is left of the proxy client's deadline; retries spend from the same budget;
- bounded retries with exponential backoff, and only on ``UNAVAILABLE`` (gRPC's transient status;
  inference has no side effect, so a repeat is safe); every other status is final, and a retry
  whose backoff would outlast the deadline is not attempted (the answer stays ``UNAVAILABLE``);
- failures become :class:`BackendError` with the gRPC status name the proxy answers with:
  ``UNAVAILABLE`` (unreachable, retries spent), ``DEADLINE_EXCEEDED``, ``INTERNAL`` (the upstream
  answered something that is not ``[M, K]`` FP32 or FP16 logits for the ``M`` items sent -- a wrong batch
  size is never passed on, so no request is handed another's result), or the upstream's own code;
- ``ready()`` is the upstream's ``ServerReady`` and ``ModelReady``, polled by a background thread at
  most every ``health_interval_s`` and served from that cache, so probes never block on the network
  and readiness turns false when the upstream dies and true again when it returns.

Known limits: the upstream must take one FP32, FP16 or UINT8 input (NCHW or NHWC; a batch is sent in
the datatype its ModelMetadata declares, as raw contents; UINT8 as levels spanning the value range)
and return one logits output (named ``logits``, or its only output) in FP32 or FP16 (read as FP32),
``[M, K]`` or ``[M, K, 1, 1]``; FP64 logits are refused as malformed rather than converted.
The upstream's metadata (input name, logits width) is read once and cached: an upstream that comes
back serving a different model needs a proxy restart.
Requests are unary (no streaming), as tritonclient and perf_analyzer use them.

The upstream's own limits: the proxy coalesces its clients' requests into batches, which a model
server may refuse where each client's request alone would pass -- Triton's ``max_batch_size`` (a
larger batch is ``INVALID_ARGUMENT``) and a gRPC server's receive limit (4 MiB unless raised: MLServer
and KServe keep it; ``RESOURCE_EXHAUSTED``). So a batch is sent as several requests, at once on the
channel, each of at most ``max_batch_items`` items (default: the ``max_batch_size`` of Triton's
``ModelConfig``, read with the metadata where the upstream serves that extension) and at most
``max_request_bytes`` bytes (one item per request when an item alone is larger: the upstream decides),
and the answers are joined in order. Each request has its retries; the first failure that is final
fails the batch.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from robustgate.models import levels
from robustgate.models.client_values import ClientValues
from robustgate.models.output_kind import to_logits
from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

from .base import Backend, BackendError, ModelMeta, TensorMeta

log = logging.getLogger(__name__)

LOGITS = "logits"
HEALTH_TIMEOUT_S = 1.0  # one readiness poll; short so a dead upstream is noticed quickly
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"  # for a call with encode_request's bytes
MODEL_CONFIG_METHOD = "/inference.GRPCInferenceService/ModelConfig"  # Triton's extension (max_batch_size)
GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024  # a gRPC server's receive limit unless it raises it (MLServer, KServe do not)
REQUEST_HEADER_BYTES = 4096  # allowance for a request's fields around its pixels (names, shape; ~100 bytes)
# answers that say nothing of whether the upstream serves ModelConfig: it is asked again later
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel arguments: message limits, keepalive, fast reconnect, no built-in retries."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),  # ping an idle-but-busy connection every 30 s
        ("grpc.keepalive_timeout_ms", 10_000),  # ...and drop it when the ping is not answered
        ("grpc.keepalive_permit_without_calls", 0),  # servers' default policy forbids more
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),  # gRPC's default grows to 120 s
        ("grpc.enable_retries", 0),  # retries are ours: bounded, UNAVAILABLE only, deadline-aware
    ]


def split_url(url: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:port"`` for IPv6) -> ``(host, port)``; ValueError otherwise."""
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url {url!r}: expected host:port (e.g. 127.0.0.1:8001), without a scheme")
    if "/" in host:
        raise ValueError(f"url {url!r}: expected host:port without a scheme or path")
    return host, int(port)


# ModelInferRequest.raw_input_contents (field 7, length-delimited): its tag byte
_RAW_INPUT_TAG = bytes([7 << 3 | 2])
_WIRE = {"FP32": "<f4", "FP16": "<f2"}  # the upstream datatypes the backend reads (logits) and sends
_SEND = {**_WIRE, "UINT8": "u1"}  # ... and the one it only sends: pixels as levels (models/levels.py)


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of ``n >= 0`` (protobuf's own encoder is internal API)."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def encode_request(x: np.ndarray, input_name: str, model_name: str, model_version: str,
                   channels_last: bool = False, datatype: str = "FP32") -> bytes:
    """``x`` [M, C, H, W] float32 (uint8 levels for UINT8) -> a serialized ModelInferRequest with one
    raw input tensor of ``datatype`` FP32, FP16 or UINT8 (what tritonclient sends too);
    ``channels_last``: sent as [M, H, W, C] (an NHWC upstream model).

    Written by hand around protobuf: the small header is a message, the pixels are appended as field
    7's bytes straight from ``x``'s buffer in one copy. Building the message with the pixels in it
    copies them three times (tobytes, the field, the serialization) and costs several times as much
    (bench/results/byo.upstream_encode.md): at 224x224 RGB a sizeable part of the proxy's own time in
    front of an upstream. Parsed with protobuf, the result is the same message
    (tests/proxy/test_upstream_backend.py)."""
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    tensor = req.inputs.add()
    tensor.name = input_name
    tensor.datatype = datatype
    if channels_last:
        x = x.transpose(0, 2, 3, 1)  # a view; the one copy below makes it contiguous
    tensor.shape.extend(x.shape)
    pixels = np.ascontiguousarray(x, dtype=_SEND[datatype])
    return b"".join([req.SerializeToString(), _RAW_INPUT_TAG, _varint(pixels.nbytes), memoryview(pixels).cast("B")])


def decode_logits(resp: pb.ModelInferResponse, output_name: str | None, m: int, k: int | None) -> np.ndarray:
    """The logits output of ``resp`` as float32 ``[m, K]``; BackendError(INTERNAL) when it is missing
    or malformed. ``output_name`` None = the response's only output; ``k`` None = any width."""
    names = [o.name for o in resp.outputs]
    if output_name is None:
        if len(names) != 1:
            raise BackendError("INTERNAL", f"upstream returned outputs {names}; expected exactly one (the logits)")
        index = 0
    elif output_name in names:
        index = names.index(output_name)
    else:
        raise BackendError("INTERNAL", f"upstream response has no output {output_name!r} (outputs: {names})")
    out = resp.outputs[index]
    if out.datatype not in _WIRE:
        raise BackendError("INTERNAL", f"upstream output {out.name!r} has datatype {out.datatype}; "
                           f"expected FP32 or FP16")
    wire = np.dtype(_WIRE[out.datatype])
    shape = _squeezed(out.shape)  # [M, K, 1, 1] is read as [M, K]
    if len(shape) != 2 or shape[0] != m or shape[1] < 1 or (k is not None and shape[1] != k):
        want = f"[{m}, {k if k is not None else 'K'}]"
        raise BackendError("INTERNAL", f"upstream output {out.name!r} has shape {list(shape)}; expected {want} "
                           f"for the {m} item(s) sent")
    count = shape[0] * shape[1]
    if resp.raw_output_contents:
        if len(resp.raw_output_contents) != len(resp.outputs):
            raise BackendError("INTERNAL", f"upstream sent {len(resp.raw_output_contents)} raw output buffers "
                               f"for {len(resp.outputs)} outputs")
        raw = resp.raw_output_contents[index]
        if len(raw) != count * wire.itemsize:
            raise BackendError("INTERNAL", f"upstream output {out.name!r}: {len(raw)} raw bytes for shape "
                               f"{list(shape)} {out.datatype} (expected {count * wire.itemsize})")
        logits = np.frombuffer(raw, dtype=wire)
    elif out.datatype != "FP32":
        raise BackendError("INTERNAL", f"upstream output {out.name!r}: {out.datatype} needs raw_output_contents")
    else:
        values = out.contents.fp32_contents
        if len(values) != count:
            raise BackendError("INTERNAL", f"upstream output {out.name!r}: {len(values)} fp32_contents for "
                               f"shape {list(shape)} (expected {count})")
        logits = np.asarray(values, dtype=np.float32)
    return logits.astype(np.float32).reshape(shape)  # [M, K], a fresh writable array


def to_model_meta(resp: pb.ModelMetadataResponse) -> ModelMeta:
    def tensors(items) -> tuple[TensorMeta, ...]:
        return tuple(TensorMeta(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items)

    return ModelMeta(resp.name, tuple(resp.versions), resp.platform, tensors(resp.inputs), tensors(resp.outputs))


class UpstreamBackend(Backend):
    """Forwards ``[M, C, H, W]`` float32 batches to an upstream V2 gRPC server; returns its logits.

    Keyword arguments (= the proxy config's ``backend.upstream`` keys, passed 1:1):

    - ``url``: ``host:port`` of the upstream's gRPC endpoint (no scheme).
    - ``model_name``: the model to call upstream.
    - ``model_version``: "" = the upstream's default version.
    - ``timeout_s``: longest time one ``infer`` may take, retries included, when the proxy's client
      set no shorter deadline (> 0).
    - ``retries``: extra attempts after an ``UNAVAILABLE`` answer (>= 0).
    - ``backoff_s``: sleep before the first retry, doubled (with +-20% jitter) before each next one
      (>= 0); never sleeps past the deadline.
    - ``health_interval_s``: seconds between readiness polls of ServerReady + ModelReady (> 0).
    - ``max_message_bytes``: gRPC send and receive limit of the channel (>= 1024).
    - ``max_batch_items``: items per upstream request (>= 1); None: the ``max_batch_size`` of the
      upstream's Triton ``ModelConfig`` when it serves one and says > 0, else no bound.
    - ``max_request_bytes``: the largest upstream request (>= 1024): a batch whose pixels, as sent, exceed it
      (less 4 KiB for the request's other fields) goes as several requests. Default 4 MiB, the receive
      limit a gRPC server keeps unless raised.
    - ``tls_ca``: PEM file of the CA that signed the upstream's certificate; any of the three TLS
      options switches the channel to TLS (the system roots are used when only the client pair is
      given).
    - ``tls_cert``, ``tls_key``: PEM client certificate chain and key for mutual TLS (both or
      neither).
    - ``layout``: the upstream model's input order, ``NCHW`` or ``NHWC`` (the bundle's
      ``input.layout``, not a config key): NHWC batches are sent as ``[M, H, W, C]``.
    - ``client_values``: the upstream model takes ``(pixels - mean) / std`` or BGR channels (the
      bundle's ``input``, models/client_values.py; not a config key): batches are sent so.
    - ``value_range``: the pixels' range (the bundle's ``input.value_range``, not a config key): an
      upstream whose ModelMetadata declares a UINT8 input gets its batches as levels 0..255 spanning
      it, rounded half up (models/levels.py).
    - ``probabilities``: the upstream's output holds probabilities (the bundle's
      ``backbone.output_kind``, not a config key): its answers are returned as their logarithms,
      the logits the pipeline reads (models/output_kind.py).

    The input tensor's name and the logits' width come from the upstream's ModelMetadata (fetched
    on first use and cached); without declared inputs the input is called ``input``.
    """

    def __init__(
        self,
        *,
        url: str,
        model_name: str,
        model_version: str = "",
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        health_interval_s: float = 1.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_batch_items: int | None = None,
        max_request_bytes: int = GRPC_DEFAULT_RECEIVE,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        layout: str = "NCHW",
        probabilities: bool = False,
        client_values: ClientValues | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
    ):
        split_url(url)
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
        self.channels_last = layout == "NHWC"
        self.probabilities = bool(probabilities)
        self.client_values = client_values
        self.value_range = (float(value_range[0]), float(value_range[1]))
        if not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be increasing, got {value_range}")
        if not model_name:
            raise ValueError("model_name must be a non-empty string")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if not health_interval_s > 0:
            raise ValueError(f"health_interval_s must be > 0, got {health_interval_s}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be an integer >= 1024, got {max_message_bytes!r}")
        if max_batch_items is not None and (isinstance(max_batch_items, bool) or not isinstance(max_batch_items, int)
                                            or max_batch_items < 1):
            raise ValueError(f"max_batch_items must be null or an integer >= 1, got {max_batch_items!r}")
        if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be an integer >= 1024, got {max_request_bytes!r}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together (mutual TLS needs both)")
        self.url, self.model_name, self.model_version = url, model_name, model_version
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self.health_interval_s = float(health_interval_s)
        self.max_request_bytes = max_request_bytes
        # items per request: the configured bound, else the upstream's ModelConfig once read (_metadata);
        # _items_known: whether the upstream's answer (or the configuration) settled it
        self.max_batch_items, self._items_known = max_batch_items, max_batch_items is not None
        self._config_asked = -float("inf")  # monotonic time of the last ModelConfig call

        options = channel_options(max_message_bytes)
        if tls_ca is None and tls_cert is None:
            self._channel = grpc.insecure_channel(url, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "tls_ca"),
                private_key=_read(tls_key, "tls_key"),
                certificate_chain=_read(tls_cert, "tls_cert"),
            )
            self._channel = grpc.secure_channel(url, credentials, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        # ModelInfer with the request already serialized (encode_request); the generated stub's
        # method would serialize a message again
        self._infer = self._channel.unary_unary(
            MODEL_INFER_METHOD, request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString)
        self._model_config = self._channel.unary_unary(
            MODEL_CONFIG_METHOD, request_serializer=ModelConfigRequest.SerializeToString,
            response_deserializer=ModelConfigResponse.FromString)

        self._meta_lock = threading.Lock()
        self._meta: ModelMeta | None = None
        self._ready = False
        self._closed = threading.Event()
        self._poll_once()  # an honest first answer instead of "not ready until the first tick"
        self._poller = threading.Thread(target=self._poll_loop, name=f"upstream-health {url}", daemon=True)
        self._poller.start()

    # ---- inference -----------------------------------------------------------------------
    def infer(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """``x`` [M, C, H, W] float32 -> [M, K] float32 logits from the upstream."""
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32:
            raise ValueError(f"x must be a float32 [M, C, H, W] array, got {getattr(x, 'dtype', type(x))} "
                             f"{getattr(x, 'shape', '')}")
        budget = self.timeout_s if timeout is None else min(self.timeout_s, timeout)
        if budget <= 0:
            raise BackendError("DEADLINE_EXCEEDED", "the client's deadline expired before the upstream call")
        deadline = time.monotonic() + budget
        meta = self._metadata(deadline)
        input_name = meta.inputs[0].name if meta.inputs else "input"
        datatype = meta.inputs[0].datatype if meta.inputs and meta.inputs[0].datatype in _SEND else "FP32"
        output_name, k = _logits_output(meta)
        cv = self.client_values
        if datatype == "UINT8":  # levels are pixels (robustgate import refuses --mean/--std with them)
            x = levels.levels(x if cv is None else cv.rgb(x), self.value_range)  # reversing is its own inverse
        elif cv is not None:  # what the model takes
            x = cv.values(x)
        step = self._items_per_request(x, datatype)
        parts = [x[i:i + step] for i in range(0, x.shape[0], step)]  # views, one per upstream request
        reqs = [encode_request(xi, input_name, self.model_name, self.model_version, self.channels_last, datatype)
                for xi in parts]
        if len(reqs) == 1:
            resps = [self._call(self._infer, reqs[0], deadline, "ModelInfer")]
        else:  # all on the wire at once (the upstream may run them side by side), answers joined in order
            sent = [self._infer.future(r, timeout=max(deadline - time.monotonic(), 1e-3), wait_for_ready=False)
                    for r in reqs]
            try:
                resps = [self._call(self._infer, r, deadline, "ModelInfer", first=f) for r, f in zip(reqs, sent)]
            finally:
                for f in sent:  # after a final failure the others' answers are not waited for
                    f.cancel()
        outs = [decode_logits(resp, output_name, len(xi), k) for resp, xi in zip(resps, parts)]  # [m_j, K] each
        out = outs[0] if len(outs) == 1 else np.concatenate(outs)  # [M, K]
        return to_logits(out) if self.probabilities else out

    def _items_per_request(self, x: np.ndarray, datatype: str) -> int:
        """How many of ``x``'s items one upstream request may carry: ``max_batch_items`` and
        ``max_request_bytes`` (module docstring); at least one."""
        item = int(np.prod(x.shape[1:])) * np.dtype(_SEND[datatype]).itemsize
        step = max(1, (self.max_request_bytes - REQUEST_HEADER_BYTES) // max(item, 1))
        return min(step, self.max_batch_items) if self.max_batch_items is not None else step

    def _call(self, method, request, deadline: float, what: str, first: "grpc.Future | None" = None):
        """One unary call with retries on UNAVAILABLE, all within ``deadline`` (monotonic); ``first``:
        the first attempt, already sent."""
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not (attempt == 0 and first is not None):
                raise BackendError("DEADLINE_EXCEEDED", f"upstream {self.url} {what}: deadline expired "
                                   f"after {attempt} attempt(s)")
            try:
                if attempt == 0 and first is not None:
                    return first.result()
                return method(request, timeout=remaining, wait_for_ready=False)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise BackendError("DEADLINE_EXCEEDED", f"upstream {self.url} {what}: deadline exceeded "
                                   f"({details})")
            if code != grpc.StatusCode.UNAVAILABLE:
                raise BackendError(code.name, f"upstream {self.url} {what}: {details}")
            if attempt == self.retries:
                break
            pause = self.backoff_s * (2 ** attempt) * random.uniform(0.8, 1.2)
            if time.monotonic() + pause >= deadline:
                raise BackendError("UNAVAILABLE", f"upstream {self.url} {what}: unavailable ({details}); "
                                   f"the deadline leaves no time to retry after attempt {attempt + 1}")
            time.sleep(pause)
        self._ready = False  # at once; the next poll turns it back on when the upstream answers
        raise BackendError("UNAVAILABLE", f"upstream {self.url} {what}: unavailable after "
                           f"{self.retries + 1} attempt(s): {details}")

    # ---- metadata ------------------------------------------------------------------------
    def metadata(self) -> ModelMeta:
        """The upstream's ModelMetadata (cached after the first success)."""
        return self._metadata(time.monotonic() + self.timeout_s)

    def _metadata(self, deadline: float) -> ModelMeta:
        meta = self._meta
        if meta is not None and (self._items_known or time.monotonic() < self._config_asked + self.health_interval_s):
            return meta
        with self._meta_lock:
            if self._meta is None:
                req = pb.ModelMetadataRequest(name=self.model_name, version=self.model_version)
                self._meta = to_model_meta(self._call(self._stub.ModelMetadata, req, deadline, "ModelMetadata"))
            if not self._items_known and time.monotonic() >= self._config_asked + self.health_interval_s:
                self._read_model_config(deadline)  # again at most every health_interval_s while unsettled
            return self._meta

    def _read_model_config(self, deadline: float) -> None:
        """``max_batch_items`` from the upstream's Triton ``ModelConfig`` (``max_batch_size`` > 0); an
        upstream that does not serve it (MLServer, KServe: UNIMPLEMENTED) sets no bound. A transient
        failure (the upstream busy or gone: TRANSIENT) leaves it unsettled, to be asked again."""
        req = ModelConfigRequest(name=self.model_name, version=self.model_version)
        self._config_asked = time.monotonic()
        try:
            resp = self._model_config(req, timeout=max(min(deadline - time.monotonic(), HEALTH_TIMEOUT_S), 1e-3))
        except grpc.RpcError as exc:
            self._items_known = exc.code() not in TRANSIENT
            return
        self._items_known = True
        if resp.config.max_batch_size > 0:
            self.max_batch_items = int(resp.config.max_batch_size)
            log.info("upstream %s model %r takes at most %d items per request (its ModelConfig's max_batch_size): "
                     "larger batches go as several requests", self.url, self.model_name, self.max_batch_items)

    # ---- readiness -----------------------------------------------------------------------
    def ready(self) -> bool:
        """The upstream's ServerReady and ModelReady as of the last poll (<= health_interval_s old)."""
        return self._ready and not self._closed.is_set()

    def _poll_once(self) -> None:
        try:
            server = self._stub.ServerReady(pb.ServerReadyRequest(), timeout=HEALTH_TIMEOUT_S)
            model = self._stub.ModelReady(
                pb.ModelReadyRequest(name=self.model_name, version=self.model_version), timeout=HEALTH_TIMEOUT_S
            )
            self._ready = bool(server.ready and model.ready)
        except grpc.RpcError:  # any failure to answer means "not ready"; the next poll retries
            self._ready = False

    def _poll_loop(self) -> None:
        while not self._closed.wait(self.health_interval_s):
            self._poll_once()

    def close(self) -> None:
        self._closed.set()
        if self._poller.is_alive() and self._poller is not threading.current_thread():
            self._poller.join(timeout=HEALTH_TIMEOUT_S * 3)
        self._channel.close()


def _triton_config_messages():
    """``(ModelConfigRequest, ModelConfigResponse)`` message classes of Triton's ``ModelConfig`` RPC
    with only the fields read here (``name`` 1, ``version`` 2; ``config`` 1 -> ``max_batch_size`` 4):
    protobuf skips the fields a class does not declare, so Triton's full answer parses into them. Built
    from a descriptor rather than Triton's ``model_config.proto`` (large, Triton-specific) or
    tritonclient's copy (not installed where the proxy only serves)."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="robustgate/triton_model_config_subset.proto",
                                               package="robustgate.triton_subset", syntax="proto3")
    config = proto.message_type.add(name="ModelConfig")
    config.field.add(name="max_batch_size", number=4, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    response = proto.message_type.add(name="ModelConfigResponse")
    response.field.add(name="config", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                       type_name=".robustgate.triton_subset.ModelConfig")
    request = proto.message_type.add(name="ModelConfigRequest")
    for number, name in ((1, "name"), (2, "version")):
        request.field.add(name=name, number=number, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # its own pool: tritonclient's full messages may be loaded too
    pool.Add(proto)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"robustgate.triton_subset.{name}"))
                 for name in ("ModelConfigRequest", "ModelConfigResponse"))


ModelConfigRequest, ModelConfigResponse = _triton_config_messages()


def _logits_output(meta: ModelMeta) -> tuple[str | None, int | None]:
    """Which declared output holds the logits, and its width K when declared."""
    outputs = {o.name: o for o in meta.outputs}
    chosen = outputs.get(LOGITS) or (meta.outputs[0] if len(meta.outputs) == 1 else None)
    if chosen is None:
        return (LOGITS if meta.outputs else None), None
    shape = tuple(chosen.shape)
    if meta.inputs and len(meta.inputs[0].shape) == 3:  # Triton (max_batch_size > 0) leaves the batch axis out
        shape = (-1, *shape)
    shape = _squeezed(shape)
    k = shape[-1] if len(shape) == 2 and shape[-1] > 0 else None
    return chosen.name, k


def _squeezed(shape) -> tuple[int, ...]:
    """``shape`` without trailing 1s past the second axis: ``[N, K, 1, 1]`` (a classifier that ends in a
    1x1 convolution and global pooling) is the logits ``[N, K]``."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read(path: str | None, key: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc}") from exc
