"""A real upstream for forwarding tests and the serving benchmark: Seldon MLServer serving a tiny
ONNX CNN over its gRPC V2 endpoint, as a subprocess on loopback ports.

- :func:`make_tiny_onnx` writes a seeded 2-conv CNN (``input`` [N, 1, 28, 28] FP32 ->
  ``logits`` [N, 10], ``features`` [N, 16]) built with ``onnx.helper`` -- no training, no torch
  export, so the fixture costs milliseconds and does not depend on the trainer's code;
- :func:`write_bundle` wraps an ONNX file into a bundle directory the proxy can serve;
- :class:`MLServerProcess` writes ``settings.json`` and one ``model-settings.json`` per model into
  a work dir and runs ``mlserver start`` on it; ``stop()`` and ``start()`` again reuse the same gRPC
  port, so a client's channel sees the upstream die and come back. MLServer's REST port gets a
  fresh free port at every start, its metrics server is disabled, parallel workers are off.

Imported as ``harness`` (pyproject's pytest ``pythonpath`` holds tests/proxy/upstream).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
MLSERVER = Path(sys.executable).with_name("mlserver")
NUM_CLASSES = 10
FEATURES = 16


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """Conv(1->8, 3x3, s2) ReLU Conv(8->16, 3x3, s2) ReLU GAP -> features [N, 16] -> Gemm -> logits [N, 10]."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),  # [N, 8, 14, 14]
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),  # [N, 16, 7, 7]
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),  # [N, 16, 1, 1]
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),  # [N, 16]
        helper.make_node("Gemm", ["features", "w3", "b3"], ["logits"], transB=1),  # [N, 10]
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        [init("w1", 8, 1, 3, 3), init("b1", 8), init("w2", FEATURES, 8, 3, 3), init("b2", FEATURES),
         init("w3", NUM_CLASSES, FEATURES), init("b3", NUM_CLASSES)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_bundle(root: Path, onnx_file: Path, name: str = "tiny") -> Path:
    """A bundle directory around ``onnx_file`` (copied in) for the proxy to serve."""
    from robustgate.models.bundle import SCHEMA_VERSION, BackboneSpec, Bundle, BundleSpec, InputSpec, artifact

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "backbone.onnx").write_bytes(Path(onnx_file).read_bytes())
    spec = BundleSpec(
        schema_version=SCHEMA_VERSION, name=name, input=InputSpec(shape=(1, 28, 28)),
        classes=[f"class{i}" for i in range(NUM_CLASSES)],
        backbone=BackboneSpec(onnx=artifact(root, "backbone.onnx"), arch="tiny-onnx-test",
                              features_output="features"),
        provenance={"command": "tests/proxy/upstream/harness.py write_bundle"},
    )
    Bundle(root, spec).save()
    return root


V2_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.uint8): "UINT8"}


def onnx_signature(onnx_file: Path) -> dict[str, list[dict]]:
    """The model's inputs and outputs as MLServer metadata tensors (symbolic dims -> -1; FP32, FP16 or
    UINT8, as the graph declares them)."""
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def tensors(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
            if dtype not in V2_DATATYPES:
                raise ValueError(f"{onnx_file}: tensor {v.name!r} is {dtype}; the test runtime serves "
                                 f"{', '.join(V2_DATATYPES.values())}")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            out.append({"name": v.name, "datatype": V2_DATATYPES[dtype], "shape": dims})
        return out

    return {"inputs": tensors(graph.input), "outputs": tensors(graph.output)}


class MLServerProcess:
    """``mlserver start`` on a work dir; ``models`` maps a model name to its settings:
    ``{"onnx": path, "sleep_s": 0.0, "fault": "none", "intra_op_threads": 1, "cancel_log": None}``
    (see mlserver_onnx.py)."""

    def __init__(self, workdir: Path, models: dict[str, dict], grpc_port: int | None = None):
        if not models:
            raise ValueError("models must name at least one model")
        self.workdir = Path(workdir)
        self.models = models
        self.grpc_port = grpc_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "mlserver.log"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _write_settings(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = {
            "debug": False, "host": "127.0.0.1", "grpc_port": self.grpc_port, "http_port": free_port(),
            "metrics_endpoint": None, "parallel_workers": 0, "load_models_at_startup": True,
            "model_repository_root": str(self.workdir / "models"),
        }
        (self.workdir / "settings.json").write_text(json.dumps(settings, indent=2))
        for name, cfg in self.models.items():
            folder = self.workdir / "models" / name
            folder.mkdir(parents=True, exist_ok=True)
            model_settings = {
                "name": name,
                "implementation": "mlserver_onnx.OnnxModel",
                "max_batch_size": 0,  # MLServer's adaptive batching off: one request, one predict()
                **onnx_signature(Path(cfg["onnx"])),
                "parameters": {
                    "uri": str(Path(cfg["onnx"]).resolve()),
                    "extra": {"sleep_s": float(cfg.get("sleep_s", 0.0)), "fault": cfg.get("fault", "none"),
                              "intra_op_threads": int(cfg.get("intra_op_threads", 1)),
                              **({"cancel_log": str(cfg["cancel_log"])} if cfg.get("cancel_log") else {})},
                },
            }
            (folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2))

    def start(self, timeout_s: float = 90.0) -> "MLServerProcess":
        """Starts MLServer and returns once ServerReady and every ModelReady answer true."""
        if self.proc is not None:
            raise RuntimeError("MLServer is already running; stop() it first")
        self._write_settings()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env = {k: v for k, v in env.items() if not k.startswith("MLSERVER_")}  # no stray settings
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(MLSERVER), "start", str(self.workdir)], cwd=self.workdir, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.proc.poll() is not None:
                    code, self.proc = self.proc.returncode, None
                    raise RuntimeError(f"mlserver exited with {code} while starting; log:\n{self.log_tail()}")
                if self._all_ready(stub):
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"mlserver not ready after {timeout_s} s; log:\n{self.log_tail()}")
                time.sleep(0.2)

    def _all_ready(self, stub) -> bool:
        try:
            if not stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                return False
            return all(stub.ModelReady(pb.ModelReadyRequest(name=n), timeout=1.0).ready for n in self.models)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.NOT_FOUND):
                return False  # still starting
            raise

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (MLServer drains), then SIGKILL if it has not exited within ``timeout_s``."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        wait_port_closed(self.grpc_port)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> "MLServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_port_closed(port: int, timeout_s: float = 10.0) -> None:
    """Returns once nothing accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"127.0.0.1:{port} still accepts connections {timeout_s} s after stop")


def infer_direct(url: str, model_name: str, x: np.ndarray, timeout_s: float = 10.0) -> dict[str, np.ndarray]:
    """Calls the upstream directly with raw FP32 input; every output as a numpy array."""
    req = pb.ModelInferRequest(model_name=model_name)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    with grpc.insecure_channel(url) as channel:
        resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=timeout_s)
    out = {}
    for i, o in enumerate(resp.outputs):
        assert o.datatype == "FP32", o.datatype
        if resp.raw_output_contents:
            out[o.name] = np.frombuffer(resp.raw_output_contents[i], dtype="<f4").reshape(tuple(o.shape))
        else:
            out[o.name] = np.asarray(o.contents.fp32_contents, dtype=np.float32).reshape(tuple(o.shape))
    return out


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    """Polls ``predicate`` (a wait, not a timing assertion: the bound only stops a hung test)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.05)
