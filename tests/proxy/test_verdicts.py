"""Verdict semantics through the real server (COMMON.md "Rejection status"), with test-local
defenses registered in conftest.py and a real registered purifier (bitdepth).

MeanDetector scores an item by its mean pixel; threshold 0.5 rejects/flags bright images."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from robustgate.defenses.base import build
from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

DARK = np.full((1, 1, 28, 28), 0.2, np.float32)
BRIGHT = np.full((1, 1, 28, 28), 0.8, np.float32)
PAIR = np.concatenate([DARK, BRIGHT])  # item 0 accepted, item 1 over the threshold


def stage(action="reject", **extra):
    return {"stages": [{"name": "brightness", "kind": "test_proxy_mean", "action": action, "threshold": 0.5}], **extra}


def infer(url, x, outputs=None):
    client = tc.InferenceServerClient(url)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tiny", [inp], outputs=[tc.InferRequestedOutput(o) for o in outputs] if outputs else None)


def raw_request(x):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def test_request_mode_rejects_with_permission_denied_and_metadata(start_proxy, ort_logits):
    p = start_proxy(pipeline=stage())
    # the rejection series exists at 0 before the first rejection (alerts see the first burst)
    assert p.server.metrics.registry.get_sample_value("robustgate_rejections_total", {"detector": "brightness"}) == 0
    with grpc.insecure_channel(p.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request(PAIR), timeout=30)
        e = err.value
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        # by default (server.explain off) neither the details nor the metadata reveal score or threshold
        assert e.details() == "rejected by robustgate: item 1 stage brightness"
        md = dict(e.trailing_metadata())
        assert md["robustgate-verdict"] == "rejected" and md["robustgate-stage"] == "brightness"
        assert md["robustgate-item"] == "1"
        assert not {"robustgate-score", "robustgate-threshold"} & set(md), md
        # the clean item alone passes; its detector score is not an output without explain (an oracle)
        ok = stub.ModelInfer(raw_request(DARK), timeout=30)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=p.server.contract.model_name), timeout=30)
    names = [o.name for o in ok.outputs]
    assert names == ["logits", "robustgate_verdict"]
    assert [o.name for o in meta.outputs] == ["logits", "robustgate_verdict"]
    np.testing.assert_allclose(np.frombuffer(ok.raw_output_contents[0], np.float32).reshape(1, 10), ort_logits(DARK), rtol=1e-5, atol=1e-6)
    # tritonclient sees the same status; counters record it
    with pytest.raises(InferenceServerException) as terr:
        infer(p.url, BRIGHT)
    assert terr.value.status() == "StatusCode.PERMISSION_DENIED" and "stage brightness" in terr.value.message()
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "rejected"}) == 2
    assert reg.get_sample_value("robustgate_rejections_total", {"detector": "brightness"}) == 2
    assert reg.get_sample_value("robustgate_items_total", {"verdict": "accepted"}) == 2  # DARK in PAIR, DARK alone
    assert reg.get_sample_value("robustgate_detector_score_count", {"detector": "brightness"}) == 4


def test_explain_names_score_and_threshold_and_metrics_keep_them_either_way(start_proxy, caplog):
    p = start_proxy(server={"explain": True}, pipeline=stage())
    with grpc.insecure_channel(p.url) as ch, caplog.at_level("INFO", logger="robustgate.proxy"):
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(raw_request(PAIR), timeout=30)
    e = err.value
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.details() == "rejected by robustgate: item 1 stage brightness score 0.8 threshold 0.5"
    md = dict(e.trailing_metadata())
    assert float(md["robustgate-score"]) == pytest.approx(0.8) and float(md["robustgate-threshold"]) == 0.5
    # the operator's view is the same with or without explain: the log line and the score histogram
    assert "rejected: item 1 stage brightness score 0.8 threshold 0.5" in caplog.text
    # and the accepted answer carries each detector's score as an extra output
    ok = infer(p.url, DARK)
    assert ok.as_numpy("robustgate_score_brightness")[0] == pytest.approx(0.2)
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_detector_score_count", {"detector": "brightness"}) == 3  # PAIR, DARK


def test_without_explain_the_log_still_has_score_and_threshold(start_proxy, caplog):
    p = start_proxy(pipeline=stage())
    with grpc.insecure_channel(p.url) as ch, caplog.at_level("INFO", logger="robustgate.proxy"):
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(raw_request(BRIGHT), timeout=30)
    assert err.value.details() == "rejected by robustgate: item 0 stage brightness"
    assert "rejected: item 0 stage brightness score 0.8 threshold 0.5" in caplog.text


def test_flag_returns_prediction_and_verdict(start_proxy, ort_logits):
    p = start_proxy(server={"explain": True}, pipeline=stage("flag"))
    res = infer(p.url, PAIR)
    np.testing.assert_allclose(res.as_numpy("logits"), ort_logits(PAIR), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), [0, 1])
    np.testing.assert_allclose(res.as_numpy("robustgate_score_brightness"), [0.2, 0.8], rtol=1e-6)
    params = res.get_response().parameters
    assert params["robustgate_verdicts"].string_param == "accepted,flagged"
    assert params["robustgate_reasons"].string_param == ",brightness"
    assert p.server.metrics.registry.get_sample_value("robustgate_requests_total", {"outcome": "flagged"}) == 1


def test_item_mode_answers_every_item_with_nan_logits_for_rejected(start_proxy, ort_logits):
    p = start_proxy(pipeline=stage(verdict_mode="item"))
    res = infer(p.url, PAIR)
    logits = res.as_numpy("logits")
    np.testing.assert_allclose(logits[0], ort_logits(DARK)[0], rtol=1e-5, atol=1e-6)
    assert np.isnan(logits[1]).all()
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), [0, 2])
    assert res.get_response().parameters["robustgate_reasons"].string_param == ",brightness"


@pytest.mark.parametrize("policy", ["fail-closed", "fail-open"])
def test_failing_stage_follows_the_failure_policy(start_proxy, ort_logits, policy):
    p = start_proxy(server={"explain": True}, pipeline={
        "stages": [{"name": "boom", "kind": "test_proxy_broken", "action": "reject", "threshold": 0.0}],
        "failure_policy": policy,
    })
    reg = p.server.metrics.registry
    if policy == "fail-closed":
        with pytest.raises(InferenceServerException) as err:
            infer(p.url, DARK)
        assert err.value.status() == "StatusCode.PERMISSION_DENIED" and "stage boom failed" in err.value.message()
        assert reg.get_sample_value("robustgate_rejections_total", {"detector": "boom"}) == 1
    else:
        res = infer(p.url, DARK)
        np.testing.assert_allclose(res.as_numpy("logits"), ort_logits(DARK), rtol=1e-5, atol=1e-6)
        assert np.isnan(res.as_numpy("robustgate_score_boom")).all()
    assert reg.get_sample_value("robustgate_stage_failures_total", {"stage": "boom", "policy": policy}) == 1


def test_detector_queries_the_local_backbone_features(start_proxy, proxy_bundle):
    p = start_proxy(server={"explain": True}, pipeline={"stages": [{"name": "fnorm", "kind": "test_proxy_featnorm", "action": "log"}]})
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    res = infer(p.url, x)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(proxy_bundle / "backbone.onnx"), providers=["CPUExecutionProvider"])
    feats = sess.run(["features"], {"input": x})[0]
    np.testing.assert_allclose(res.as_numpy("robustgate_score_fnorm"), np.linalg.norm(feats, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), [0, 0, 0])


def test_registered_purifier_runs_before_classify(start_proxy, ort_logits):
    p = start_proxy(pipeline={"stages": [{"name": "squeeze", "kind": "bitdepth", "params": {"bits": 2}}]})
    x = np.random.default_rng(2).random((2, 1, 28, 28), dtype=np.float32)
    want = ort_logits(build("bitdepth", bits=2).purify(torch.from_numpy(x)).numpy())
    np.testing.assert_allclose(infer(p.url, x).as_numpy("logits"), want, rtol=1e-5, atol=1e-6)


def test_full_queue_answers_resource_exhausted(start_proxy, ort_logits):
    gate, entered = threading.Event(), threading.Event()
    p = start_proxy(
        pipeline={"stages": [{"name": "gate", "kind": "test_proxy_gate", "params": {"gate": gate, "entered": entered}}]},
        batching={"max_batch_size": 1, "max_queue_items": 2, "workers": 1}, limits={"max_batch_items": 2},  # one batch at a time
        server={"warmup": False},  # the warm-up's batches would stop at the gate
    )
    xs = [np.full((1, 1, 28, 28), v, np.float32) for v in (0.1, 0.3, 0.6)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(lambda: infer(p.url, xs[0]).as_numpy("logits"))
        assert entered.wait(30), "first request never reached the pipeline"
        queued = [pool.submit(lambda x=x: infer(p.url, x).as_numpy("logits")) for x in xs[1:]]
        for _ in range(600):  # until both wait in the queue
            if p.server.batcher.depth == 2:
                break
            time.sleep(0.05)
        assert p.server.batcher.depth == 2
        with pytest.raises(InferenceServerException) as err:
            infer(p.url, DARK)
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "max_queue_items" in err.value.message()
        assert p.server.metrics.registry.get_sample_value("robustgate_queue_depth") == 2
        gate.set()
        answers = [running.result(60)] + [f.result(60) for f in queued]
    for x, got in zip(xs, answers):
        np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "resource_exhausted"}) == 1
    assert reg.get_sample_value("robustgate_queue_depth") == 0


def test_client_deadline_passing_in_the_queue_answers_deadline_exceeded(start_proxy, ort_logits):
    gate, entered = threading.Event(), threading.Event()
    p = start_proxy(
        pipeline={"stages": [{"name": "gate", "kind": "test_proxy_gate", "params": {"gate": gate, "entered": entered}}]},
        batching={"max_batch_size": 1, "workers": 1},  # one batch at a time: the second request waits
        server={"warmup": False},  # the warm-up's batches would stop at the gate
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: infer(p.url, DARK).as_numpy("logits"))
        assert entered.wait(30)
        with grpc.insecure_channel(p.url) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(raw_request(BRIGHT), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        np.testing.assert_allclose(running.result(60), ort_logits(DARK), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(infer(p.url, DARK).as_numpy("logits"), ort_logits(DARK), rtol=1e-5, atol=1e-6)
    reg = p.server.metrics.registry
    for _ in range(200):  # the server notices the expiry asynchronously
        if reg.get_sample_value("robustgate_requests_total", {"outcome": "deadline_exceeded"}) == 1:
            break
        time.sleep(0.05)
    assert reg.get_sample_value("robustgate_requests_total", {"outcome": "deadline_exceeded"}) == 1
    assert reg.get_sample_value("robustgate_batch_size_count") == 2  # the expired request never ran
