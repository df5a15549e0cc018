"""The loopback fuzzing campaign of bench/hardening/fuzz.py at a small size (the bench run records
>= 100,000 cases): malformed ModelInfer requests over real gRPC to a real proxy; zero crashes,
every answer a documented status with a message, well-formed ones answered correctly, the server
healthy afterwards. Plus the one defect the campaign found: bytes that are no valid protobuf
message answered UNKNOWN from grpc's deserializer; they now answer INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from robustgate.protos import open_inference_grpc_pb2 as pb


@pytest.fixture(scope="module")
def fuzzed(launch):
    p = launch(limits={"max_batch_items": 4}, batching={"max_batch_size": 8, "max_queue_items": 64})
    yield p
    p.stop()


def target(fuzz, proxy, ort_logits):
    images = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)  # [64, 1, 28, 28]
    return fuzz.Target(model="tiny", input_name="input", item_shape=(1, 28, 28), max_items=4, images=images,
                       reference=ort_logits)


def test_campaign_has_no_crash_and_the_server_stays_healthy(fuzz, fuzzed, ort_logits):
    t = target(fuzz, fuzzed, ort_logits)
    stats = asyncio.run(fuzz.run_campaign(fuzzed.url, t, cases=400, seed=1, concurrency=4))
    summary = fuzz.summarize(stats, fuzz.after_check(fuzzed.url, t))
    assert summary["cases"] == 400
    assert summary["crashes"] == 0 and summary["violations"] == 0, summary["first_violations"]
    assert summary["mismatches"] == 0 and summary["empty_messages"] == 0
    assert summary["after"] == {"ready": True, "live": True, "answer_correct": True}
    # the campaign reached every part of the oracle: served, refused by the codec, corrupted on the wire
    assert summary["statuses"].get("OK", 0) > 20 and summary["statuses"].get("INVALID_ARGUMENT", 0) > 100
    assert summary["statuses"].get("NOT_FOUND", 0) > 10 and "corrupt bytes" in summary["by_mutation"]
    reg = fuzzed.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "internal"}) == 0


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x2a\x80"])
def test_undecodable_bytes_answer_invalid_argument(fuzzed, payload):
    with grpc.insecure_channel(fuzzed.url) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(payload, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "not a valid inference.ModelInferRequest message" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/inference.GRPCInferenceService/ModelReady")(payload, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive", request_serializer=pb.ServerLiveRequest.SerializeToString,
                              response_deserializer=pb.ServerLiveResponse.FromString)(pb.ServerLiveRequest(), timeout=10)
    assert live.live
