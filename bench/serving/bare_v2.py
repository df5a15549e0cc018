"""A bare Open Inference Protocol server: grpc.aio, one ONNX Runtime session, nothing else -- the
fair in-process reference for the proxy's latency (the raw ONNX Runtime loop has no transport at
all, so "proxy vs raw" also counts the gRPC round trip of a 600 KB request that any V2 server pays).

ModelInfer takes one FP32 input in ``raw_input_contents``, runs the session on it (in a worker
thread, as a server must to keep its event loop free) and answers the first output as raw
contents. No validation beyond the byte count, no batching, no metrics: what remains of the
proxy's p50 over this server's is the proxy's own work. The session has ONNX Runtime's default
options unless ``--no-spinning`` (the proxy's ``backend.onnxruntime.spinning: false``).

    python bench/serving/bare_v2.py --onnx MODEL.onnx --port PORT [--model NAME] [--no-spinning]

Written by hand because no installed V2 server (MLServer, KServe) runs an ONNX session without
its own request handling on top, which is what this reference must leave out.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np
import onnxruntime as ort

from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 << 20  # the proxy's own limit (server.max_message_bytes)


class Bare(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, session: ort.InferenceSession, model: str):
        self.session, self.model = session, model
        self.input = session.get_inputs()[0]
        self.output = session.get_outputs()[0].name

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelMetadata(self, request, context):
        resp = pb.ModelMetadataResponse(name=self.model, versions=["1"], platform="onnxruntime_onnx")
        resp.inputs.add(name=self.input.name, datatype="FP32", shape=[-1, *self.input.shape[1:]])
        return resp

    async def ModelInfer(self, request, context):
        shape = tuple(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)  # [N, C, H, W]
        (y,) = await asyncio.get_running_loop().run_in_executor(None, self.session.run, [self.output],
                                                                {self.input.name: x})
        resp = pb.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        resp.outputs.add(name=self.output, datatype="FP32", shape=list(y.shape))
        resp.raw_output_contents.append(np.ascontiguousarray(y, dtype=np.float32).tobytes())
        return resp


async def serve(args: argparse.Namespace) -> None:
    opts = ort.SessionOptions()
    if args.no_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(session, args.model), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="model")
    p.add_argument("--no-spinning", action="store_true", help="session.intra_op.allow_spinning 0, as the proxy")
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
