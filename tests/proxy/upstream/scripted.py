"""A scripted Open Inference Protocol gRPC server for the upstream backend's failure paths.

MLServer (harness.py) is the real upstream; this server exists for what MLServer cannot be made
to do on demand: answer a given status N times and then succeed (retry policy), answer
malformed tensors (typed contents, wrong byte counts, a wrong class count), flip its readiness,
and serve over TLS with client-certificate checks (MLServer's gRPC endpoint has no TLS option).
It is a real grpc server on 127.0.0.1; only the model behind it is a formula:
``logits[i, k] = mean(x[i]) + k`` (so every row tells which item it came from).
"""

from __future__ import annotations

import subprocess
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

K = 10
ANSWERS = ("raw", "typed", "short_raw", "wrong_k")


def formula_logits(x: np.ndarray, k: int = K) -> np.ndarray:
    """x [M, C, H, W] -> [M, k]: mean(x[i]) + k."""
    return (x.reshape(len(x), -1).mean(axis=1, dtype=np.float64)[:, None] + np.arange(k)).astype(np.float32)


class ScriptedUpstream(pb_grpc.GRPCInferenceServiceServicer):
    """``script``: status codes that the next ModelInfer calls fail with, one per call; then answers
    of the kind ``answer``. ``calls`` counts ModelInfer calls, ``batches`` lists the items of each
    (failed ones included), in the order they arrived. ``max_batch_size`` not None: the server also
    answers Triton's ``ModelConfig`` with it (tritonclient's messages), after failing the first calls
    with the codes in ``config_script``; ``config_calls`` counts them. None: UNIMPLEMENTED (MLServer)."""

    def __init__(self, answer: str = "raw", max_batch_size: int | None = None):
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}")
        self.answer = answer
        self.max_batch_size = max_batch_size
        self.config_script: list[grpc.StatusCode] = []
        self.config_calls = 0
        self.script: list[grpc.StatusCode] = []
        self.batches: list[int] = []
        self.server_ready = True
        self.model_ready = True
        self._lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.port = 0

    @property
    def calls(self) -> int:
        """ModelInfer calls answered or failed so far (reset: ``batches = []``)."""
        return len(self.batches)

    # ---- the service -------------------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server_ready)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.model_ready and request.name == "formula")

    def ModelMetadata(self, request, context):
        if request.name != "formula":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        resp = pb.ModelMetadataResponse(name="formula", versions=["1"], platform="scripted")
        resp.inputs.add(name="pixels", datatype="FP32", shape=[-1, 1, 4, 4])
        resp.outputs.add(name="logits", datatype="FP32", shape=[-1, K])
        return resp

    def ModelInfer(self, request, context):
        with self._lock:
            self.batches.append(int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 0)
            code = self.script.pop(0) if self.script else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        tensor = request.inputs[0]
        if tensor.name != "pixels" or tensor.datatype != "FP32":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected input {tensor.name} {tensor.datatype}")
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(tensor.shape))
        logits = formula_logits(x, K + 1 if self.answer == "wrong_k" else K)  # [M, K]
        resp = pb.ModelInferResponse(model_name="formula", model_version="1", id=request.id)
        out = resp.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
        if self.answer == "typed":
            out.contents.fp32_contents.extend(logits.ravel().tolist())
        else:
            raw = logits.astype("<f4").tobytes()
            resp.raw_output_contents.append(raw[:-4] if self.answer == "short_raw" else raw)
        return resp

    def ModelConfig(self, request, context):
        from tritonclient.grpc import service_pb2

        with self._lock:
            self.config_calls += 1
            code = self.config_script.pop(0) if self.config_script else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        resp = service_pb2.ModelConfigResponse()
        resp.config.name, resp.config.platform, resp.config.max_batch_size = "formula", "scripted", self.max_batch_size
        resp.config.input.add(name="pixels", dims=[1, 4, 4])  # fields the backend does not read, on the wire too
        return resp

    def _config_handler(self) -> grpc.GenericRpcHandler:
        from tritonclient.grpc import service_pb2

        method = grpc.unary_unary_rpc_method_handler(
            self.ModelConfig, request_deserializer=service_pb2.ModelConfigRequest.FromString,
            response_serializer=service_pb2.ModelConfigResponse.SerializeToString)
        return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelConfig": method})

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, tls: tuple[Path, Path, Path | None] | None = None) -> "ScriptedUpstream":
        """Serves on a free 127.0.0.1 port; ``tls`` = (server cert, server key, client CA or None)."""
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self, self.server)
        if self.max_batch_size is not None:
            self.server.add_generic_rpc_handlers([self._config_handler()])
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            cert, key, client_ca = tls
            credentials = grpc.ssl_server_credentials(
                [(Path(key).read_bytes(), Path(cert).read_bytes())],
                root_certificates=Path(client_ca).read_bytes() if client_ca else None,
                require_client_auth=client_ca is not None,
            )
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()
        return self

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None


def make_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for IP 127.0.0.1 and a client certificate (openssl CLI)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=robustgate-test-ca")
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")]:
        (folder / f"{name}.ext").write_text(ext)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=robustgate-test-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
