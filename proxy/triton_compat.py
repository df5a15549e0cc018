"""Triton's ``ModelConfig`` RPC, so that Triton's ``perf_analyzer`` runs against the proxy unchanged.

``ModelConfig`` is a Triton extension of ``inference.GRPCInferenceService``, not part of the Open
Inference Protocol (protos/), and perf_analyzer stops at start-up without it ("failed to get
model config"). It is served here through a generic handler with tritonclient's own generated
messages (``model_config.proto`` is large and Triton-specific; tritonclient is already a
dependency), so the OIP proto stays the public spec. The config describes what the proxy accepts:
the bundle's input (per-item dims, FP32), the logits output and ``robustgate_verdict``, and
``max_batch_size = limits.max_batch_items``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from robustgate.proxy.server import ProxyServer

SERVICE = "inference.GRPCInferenceService"


def model_config_handler(proxy: "ProxyServer") -> grpc.GenericRpcHandler | None:
    """A generic handler for ``/inference.GRPCInferenceService/ModelConfig``; None without tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2, service_pb2
    except ImportError:  # optional: without it ModelConfig stays UNIMPLEMENTED
        return None

    def config() -> "service_pb2.ModelConfigResponse":
        c = proxy.contract
        resp = service_pb2.ModelConfigResponse()
        cfg = resp.config
        cfg.name = c.model_name
        cfg.platform = proxy.meta.platform or "onnxruntime_onnx"
        cfg.max_batch_size = c.max_batch_items
        fmt = model_config_pb2.ModelInput
        cfg.input.add(name=c.input_name, data_type=model_config_pb2.TYPE_FP32, dims=list(c.wire_shape),
                      format=fmt.FORMAT_NHWC if c.channels_last else fmt.FORMAT_NCHW)
        k = next((o.shape[-1] for o in proxy.meta.outputs if o.name == c.logits_output), len(proxy.bundle.classes))
        cfg.output.add(name=c.logits_output, data_type=model_config_pb2.TYPE_FP32, dims=[k])
        verdict = cfg.output.add(name="robustgate_verdict", data_type=model_config_pb2.TYPE_INT32, dims=[1])
        verdict.reshape.SetInParent()  # per item a scalar: [N] on the wire
        return resp

    async def model_config(request, context):
        if request.name != proxy.contract.model_name or (request.version and request.version not in proxy.contract.versions):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r} version {request.version!r}")
        return config()

    handler = grpc.unary_unary_rpc_method_handler(
        model_config,
        request_deserializer=service_pb2.ModelConfigRequest.FromString,
        response_serializer=service_pb2.ModelConfigResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelConfig": handler})
