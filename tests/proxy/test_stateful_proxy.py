"""The stateful stage served (issue 22, items 1 and 2): a real proxy on loopback, the real
tritonclient, several client identities (bearer tokens, the x-client-id header).

- a query-attack stream (near-duplicates of one image) is rejected, and with ``action: block`` the
  client is refused RESOURCE_EXHAUSTED with a retry hint until its cool-down ends, while a benign
  stream of distinct Fashion-MNIST test images with exact retries is never refused;
- a hot reload keeps the store (the attacker's history) and applies the new threshold;
- two proxies sharing one real redis-server see one client's stream; a Redis failure follows the
  pipeline's failure policy;
- output policies change what an accepted answer carries on the wire.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from robustgate.proxy import outputs
from robustgate.proxy.config import load_config

from streams import SMALL_STORE, ask, attack_stream, fmnist_images, linf_stream  # tests/helpers

ATTACKER = {"authorization": "Bearer attacker-token"}
BENIGN = {"authorization": "Bearer benign-token"}
GATEWAY = {"x-client-id": "gateway-client-7"}


def stateful_stage(**over) -> dict:
    return {"name": "sd", "kind": "stateful", "action": "reject", "threshold": 10.0, "store": SMALL_STORE, **over}


def metric(port: int, name: str, labels: dict | None = None) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


def test_attack_rejected_benign_stream_and_retries_accepted(start_proxy):
    p = start_proxy(pipeline={"stages": [stateful_stage()]})
    benign = fmnist_images(60)
    sent = 0
    for i, x in enumerate(benign):  # distinct test images, every 4th retried exactly (a client's retry)
        for _ in range(2 if i % 4 == 0 else 1):
            status, *_ = ask(p.url, x[None], BENIGN)
            assert status == "ok", (i, status, _)
            sent += 1
    for i, x in enumerate(fmnist_images(20, offset=100)):  # a second benign client, named by a gateway header
        assert ask(p.url, x[None], GATEWAY)[0] == "ok", i

    answers = [ask(p.url, x[None], ATTACKER) for x in attack_stream(benign[0], 20)]
    refused = [a for a in answers if a[0] != "ok"]
    assert answers[0][0] == "ok"  # the first query has no history
    assert len(refused) >= 17, [a[0] for a in answers]
    for status, message in refused:
        assert status == "StatusCode.PERMISSION_DENIED"
        assert message.startswith("rejected by robustgate: item 0 stage sd"), message
    # the attacker's history is its own: the benign client sending the same base image again is an exact retry of its own
    assert ask(p.url, benign[0][None], BENIGN)[0] == "ok"
    assert metric(p.metrics_port, "robustgate_stateful_detections_total", {"stage": "sd"}) == len(refused)
    assert metric(p.metrics_port, "robustgate_stateful_clients", {"stage": "sd"}) == 3
    assert metric(p.metrics_port, "robustgate_stateful_entries", {"stage": "sd"}) == sent - 15 + 20 + 20
    assert metric(p.metrics_port, "robustgate_stateful_bytes", {"stage": "sd"}) > 0
    assert metric(p.metrics_port, "robustgate_stateful_observe_duration_seconds_count", {"stage": "sd"}) > 0


def test_block_refuses_the_client_until_its_cool_down_ends(start_proxy):
    p = start_proxy(pipeline={"stages": [stateful_stage(action="block", cooldown_s=2.0, block_after=1)]})
    stream = attack_stream(fmnist_images(1)[0], 6, seed=1)
    first = [ask(p.url, x[None], ATTACKER) for x in stream[:3]]
    assert first[0][0] == "ok"
    status, message = first[1]
    assert status == "StatusCode.RESOURCE_EXHAUSTED", first
    assert re.fullmatch(r"client refused by robustgate: retry after \d+ s; stage sd", message), message
    assert "score" not in message and "threshold" not in message
    # blocked: even a distinct image is refused now, without being observed
    fresh = fmnist_images(3, offset=500)
    assert ask(p.url, fresh[0][None], ATTACKER)[0] == "StatusCode.RESOURCE_EXHAUSTED"
    assert ask(p.url, fresh[1][None], BENIGN)[0] == "ok"  # other clients are not affected
    assert metric(p.metrics_port, "robustgate_clients_blocked_total", {"reason": "sd"}) == 1
    assert metric(p.metrics_port, "robustgate_queries_refused_total", {"reason": "sd"}) == 3
    assert metric(p.metrics_port, "robustgate_requests_total", {"outcome": "blocked"}) == 3
    time.sleep(2.2)
    assert ask(p.url, fresh[2][None], ATTACKER)[0] == "ok"  # the cool-down ended


def test_block_after_several_detections(start_proxy):
    p = start_proxy(pipeline={"stages": [stateful_stage(action="block", cooldown_s=60.0, block_after=3)]})
    answers = [ask(p.url, x[None], ATTACKER) for x in attack_stream(fmnist_images(1, offset=9)[0], 5, seed=6)]
    assert [a[0] for a in answers] == ["ok", "StatusCode.PERMISSION_DENIED", "StatusCode.PERMISSION_DENIED",
                                       "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.RESOURCE_EXHAUSTED"], answers
    assert metric(p.metrics_port, "robustgate_clients_blocked_total", {"reason": "sd"}) == 1


def test_block_answer_carries_the_retry_hint_in_trailers(start_proxy):
    import grpc

    from robustgate.protos import open_inference_grpc_pb2 as pb
    from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

    p = start_proxy(pipeline={"stages": [stateful_stage(action="block", cooldown_s=30.0, block_after=1)]})
    stream = attack_stream(fmnist_images(1, offset=7)[0], 3, seed=2)
    with grpc.insecure_channel(p.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        trailers = None
        for x in stream:
            req = pb.ModelInferRequest(model_name="tiny")
            t = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
            t.contents.fp32_contents.extend(x.ravel().tolist())
            try:
                stub.ModelInfer(req, metadata=(("x-client-id", "raw-grpc"),), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailers = dict(exc.trailing_metadata())
                break
    assert trailers is not None
    assert trailers["robustgate-verdict"] == "blocked" and trailers["robustgate-stage"] == "sd"
    assert 28_000 < int(trailers["retry-after-ms"]) <= 30_000


def test_reload_keeps_the_history_and_applies_the_new_threshold(start_proxy, proxy_bundle, tmp_path):
    path = tmp_path / "proxy.yaml"

    def write(threshold: float) -> None:
        path.write_text(yaml.safe_dump({"bundle": str(proxy_bundle), "pipeline": {"stages": [
            stateful_stage(threshold=threshold)]}}))

    write(1000.0)  # nothing is rejected yet: the history builds up
    p = start_proxy(pipeline={"stages": [stateful_stage(threshold=1000.0)]})
    p.server.config_loader = lambda: load_config(path, environ={}, overrides={
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1"}})
    stream = attack_stream(fmnist_images(1, offset=3)[0], 6, seed=3)
    for x in stream[:5]:
        assert ask(p.url, x[None], ATTACKER)[0] == "ok"
    store = p.server.runner.stores["sd"][1]
    write(10.0)
    summary = p.call(p.server.reload())
    assert summary["thresholds"]["sd"] == 10.0
    assert p.server.runner.stores["sd"][1] is store  # the same store object, handed over
    status, message = ask(p.url, stream[5][None], ATTACKER)  # judged against the history sent before the reload
    assert status == "StatusCode.PERMISSION_DENIED" and "stage sd" in message


# ---- shared state through a real Redis ----------------------------------------------------------------
def test_two_proxies_sharing_redis_see_one_clients_stream(start_proxy, redis_server):
    url, proc = redis_server
    store = {"kind": "redis", "url": url, "max_per_client": 1000, "ttl_s": 600, "socket_timeout_s": 0.5}
    a = start_proxy(pipeline={"stages": [stateful_stage(store=store)]})
    b = start_proxy(pipeline={"stages": [stateful_stage(store=store)]})
    stream = attack_stream(fmnist_images(1, offset=11)[0], 10, seed=4)
    # the load balancer alternates the attacker between the pods: each pod alone sees every other query
    answers = [ask((a, b)[i % 2].url, x[None], GATEWAY)[0] for i, x in enumerate(stream)]
    assert answers[0] == "ok"
    assert answers[1] == "StatusCode.PERMISSION_DENIED"  # b's first query of this client matches a's
    assert answers.count("StatusCode.PERMISSION_DENIED") >= 8, answers
    for i, x in enumerate(fmnist_images(10, offset=200)):
        assert ask((a, b)[i % 2].url, x[None], BENIGN)[0] == "ok", i
    assert metric(a.metrics_port, "robustgate_stateful_clients", {"stage": "sd"}) == 2

    # Redis goes away: the stage fails and follows the failure policy (fail-closed: rejected, named)
    proc.terminate()
    proc.wait(timeout=10)
    status, message = ask(a.url, fmnist_images(1, offset=300), BENIGN)
    assert status == "StatusCode.PERMISSION_DENIED" and "stage sd failed" in message, (status, message)
    assert metric(a.metrics_port, "robustgate_stage_failures_total", {"stage": "sd", "policy": "fail-closed"}) == 1


def test_redis_failure_fail_open_answers(start_proxy, redis_server):
    url, proc = redis_server
    p = start_proxy(pipeline={"stages": [stateful_stage(store={"kind": "redis", "url": url, "socket_timeout_s": 0.5})],
                              "failure_policy": "fail-open"})
    assert ask(p.url, fmnist_images(1), BENIGN)[0] == "ok"
    proc.terminate()
    proc.wait(timeout=10)
    assert ask(p.url, fmnist_images(1, offset=1), BENIGN)[0] == "ok"
    assert metric(p.metrics_port, "robustgate_stage_failures_total", {"stage": "sd", "policy": "fail-open"}) == 1


# ---- output policies on the wire ------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [{"policy": "logits"}, {"policy": "top_k", "k": 3, "decimals": 2},
                                    {"policy": "label"}, {"policy": "aaa", "tau": 0.5, "alpha": 0.9}])
def test_output_policies_on_the_wire(start_proxy, ort_logits, policy):
    p = start_proxy(outputs=policy)
    x = fmnist_images(4, offset=40)
    with tc.InferenceServerClient(p.url) as client:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("tiny", [inp], client_timeout=60).as_numpy("logits")
    z = ort_logits(x)
    assert got.shape == z.shape == (4, 10)
    np.testing.assert_array_equal(got.argmax(axis=1), z.argmax(axis=1))  # every policy keeps the decision
    if policy["policy"] == "logits":
        np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-5)
    elif policy["policy"] == "top_k":
        np.testing.assert_allclose(got, outputs.top_k_probabilities(z, 3, 2), atol=1e-6)
        assert ((got > 0).sum(axis=1) <= 3).all()
    elif policy["policy"] == "label":
        np.testing.assert_array_equal(got, np.eye(10, dtype=np.float32)[z.argmax(axis=1)])
    else:
        np.testing.assert_allclose(got, outputs.aaa(z, tau=0.5, alpha=0.9), rtol=1e-4, atol=1e-4)
        assert not np.allclose(got, z, atol=1e-3)


def test_bad_output_policy_names_the_key(proxy_bundle):
    from robustgate.proxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"outputs\.policy"):
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "outputs": {"policy": "probits"}})
    with pytest.raises(ConfigError, match=r"action: block needs kind stateful"):
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "pipeline": {"stages": [
            {"name": "m", "kind": "test_proxy_mean", "action": "block", "threshold": 0.5}]}})
    with pytest.raises(ConfigError, match=r"block_window \(3\) must be at least block_after \(5\)"):
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "pipeline": {"stages": [
            stateful_stage(action="block", block_window=3)]}})


# ---- the threshold from the bundle ---------------------------------------------------------------------
def test_fit_calibrates_on_benign_streams_and_the_proxy_serves_the_bundles_threshold(start_proxy, proxy_bundle, tmp_path):
    from robustgate.defenses.cli import fit_defense
    from robustgate.models.bundle import Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(proxy_bundle, bundle)
    x = fmnist_images(900, offset=1000)
    y = np.zeros(len(x), dtype=np.int64)
    import torch

    splits = {k: (torch.from_numpy(x[i * 300:(i + 1) * 300]), torch.from_numpy(y[:300]))
              for i, k in enumerate(("train", "val", "test"))}
    # 300 validation images (~360 queries) can show a 5% rate with 95% confidence, not 1% (the bound
    # needs about 300 queries per flagged one at 1%: defenses/stateful/calibration.py)
    spec = fit_defense(bundle, "stateful", name="sd", params={"top_k": 20}, target_fpr=0.05, splits=splits, log=lambda *_: None)
    fitted = Bundle.load(bundle).spec.defenses["sd"]
    assert fitted.kind == "stateful" and fitted.threshold == spec["threshold"]
    assert fitted.calibration["val_fpr_upper"] <= 0.05 and fitted.calibration["val_fpr"] < 0.05
    assert fitted.calibration["n_val"] > 300  # retries and near-duplicates too
    assert "store" not in fitted.params

    p = start_proxy(bundle=bundle, pipeline={"stages": [{"name": "sd", "kind": "stateful", "store": SMALL_STORE}]})
    assert p.server.pipeline_summary()["thresholds"]["sd"] == fitted.threshold
    answers = [ask(p.url, q[None], ATTACKER)[0] for q in attack_stream(x[0], 10, seed=5)]
    assert answers.count("StatusCode.PERMISSION_DENIED") >= 8, answers


# ---- several clients in one batch ----------------------------------------------------------------------
def test_one_batch_observes_each_client_in_arrival_order():
    import torch

    from robustgate.defenses.assemble import PipelineConfig, build_stages
    from robustgate.defenses.pipeline import REJECTED, DefendedModel

    cfg = PipelineConfig.model_validate({"stages": [stateful_stage()]})
    stages = build_stages(cfg, None)
    model = DefendedModel(stages, classify=lambda x: torch.zeros(x.shape[0], 10))
    base = fmnist_images(2, offset=60)
    near = attack_stream(base[0], 3, seed=7)
    # A's three near-copies interleaved with B's two distinct images, one batch
    x = torch.from_numpy(np.stack([near[0], base[1], near[1], base[1], near[2]]))
    clients = ["A", "B", "A", "B", "A"]
    r = model(x, clients=clients)
    s = r.scores["sd"].tolist()
    assert s[0] == 0 and s[1] == 0 and s[3] == 0  # A's first query, B's image and B's exact retry
    assert s[2] > 10 and s[4] > 10  # each A query against A's earlier ones of the same batch
    assert r.verdict.tolist() == [0, 0, REJECTED, 0, REJECTED] and r.reason[2] == "sd"
    # without identities (the red team's white-box runs) the stage is skipped: nothing observed
    assert "sd" not in model(x).scores
    assert stages[0].defense.store.stats()["entries"] == 4  # A x3, B x1 (the retry is not recorded)


# ---- method knn: the learned encoder served -----------------------------------------------------------
KNN_K = 3


@pytest.fixture(scope="module")
def knn_bundle(proxy_bundle, tmp_path_factory):
    """The proxy's tiny bundle with ``sd`` fitted as ``method: knn`` (k 3; a 100-step encoder on 300
    Fashion-MNIST test images; threshold at 1% benign FPR with 95% confidence on 300 more, which
    about 360 validation queries show only with none flagged: the largest validation score)."""
    import torch

    from robustgate.defenses.cli import fit_defense

    bundle = tmp_path_factory.mktemp("knn") / "bundle"
    shutil.copytree(proxy_bundle, bundle)
    x = fmnist_images(900, offset=2000)
    y = np.zeros(len(x), dtype=np.int64)
    splits = {k: (torch.from_numpy(x[i * 300:(i + 1) * 300]), torch.from_numpy(y[:300]))
              for i, k in enumerate(("train", "val", "test"))}
    fit_defense(bundle, "stateful", name="sd", params={"method": "knn", "k": KNN_K, "steps": 100, "batch_size": 32},
                target_fpr=0.01, splits=splits, log=lambda *_: None)
    return bundle


def knn_stage(**over) -> dict:
    return {"name": "sd", "kind": "stateful", "action": "block", "cooldown_s": 60.0, "block_after": 2,
            "store": {"kind": "memory", "max_entries": 4096, "max_per_client": 1024, "max_clients": 64, "ttl_s": 600},
            **over}


def test_knn_flags_an_attack_from_query_k_plus_1_and_blocks_it_benign_stream_served(start_proxy, knn_bundle):
    p = start_proxy(bundle=knn_bundle, pipeline={"stages": [knn_stage()]})
    benign = fmnist_images(60, offset=5000)
    for i in np.random.default_rng(0).permutation(len(benign)):  # distinct images, shuffled, every 5th retried
        for _ in range(2 if i % 5 == 0 else 1):
            assert ask(p.url, benign[i][None], BENIGN)[0] == "ok", i
    answers = [ask(p.url, q[None], ATTACKER)[0] for q in linf_stream(benign[0], 8, seed=1)]
    # k earlier queries are needed: the first k are answered, query k + 1 is a detection (rejected),
    # query k + 2 the second, which blocks the client (block_after 2): it and the rest are refused
    assert answers[:KNN_K] == ["ok"] * KNN_K, answers
    assert answers[KNN_K] == "StatusCode.PERMISSION_DENIED", answers
    assert set(answers[KNN_K + 1:]) == {"StatusCode.RESOURCE_EXHAUSTED"}, answers
    assert metric(p.metrics_port, "robustgate_clients_blocked_total", {"reason": "sd"}) == 1
    assert metric(p.metrics_port, "robustgate_stateful_clients", {"stage": "sd"}) == 2
    assert ask(p.url, benign[1][None], BENIGN)[0] == "ok"  # the benign client is not affected


def test_knn_two_proxies_sharing_redis_see_one_clients_stream(start_proxy, knn_bundle, redis_server):
    """The k-NN history in a real Redis (``store: {kind: redis}``): an attacker the load balancer
    alternates between two pods is flagged at its query k + 1, as by one pod; each pod alone holds
    half of its queries, too few to flag it then."""
    url, _ = redis_server
    store = {"kind": "redis", "url": url, "max_per_client": 1024, "ttl_s": 600, "socket_timeout_s": 0.5}
    a, b = (start_proxy(bundle=knn_bundle, pipeline={"stages": [knn_stage(action="reject", store=store)]})
            for _ in range(2))
    answers = [ask((a, b)[i % 2].url, q[None], ATTACKER)[0]
               for i, q in enumerate(linf_stream(fmnist_images(1, offset=5200)[0], KNN_K + 3, seed=3))]
    assert answers[:KNN_K] == ["ok"] * KNN_K, answers
    assert set(answers[KNN_K:]) == {"StatusCode.PERMISSION_DENIED"}, answers
    for i, x in enumerate(fmnist_images(12, offset=5300)):  # a benign stream over both pods: served
        assert ask((a, b)[i % 2].url, x[None], BENIGN)[0] == "ok", i
    assert metric(a.metrics_port, "robustgate_stateful_clients", {"stage": "sd"}) == 2


def test_knn_reload_keeps_the_histories(start_proxy, knn_bundle, tmp_path):
    from robustgate.models.bundle import Bundle

    path = tmp_path / "proxy.yaml"
    fitted = Bundle.load(knn_bundle).spec.defenses["sd"].threshold
    stage = knn_stage(action="reject", threshold=1.0)  # scores lie in [0, 1]: nothing is flagged yet
    p = start_proxy(bundle=knn_bundle, pipeline={"stages": [stage]})
    p.server.config_loader = lambda: load_config(path, environ={}, overrides={
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1"}})
    stream = linf_stream(fmnist_images(1, offset=5100)[0], KNN_K + 1, seed=2)
    for q in stream[:KNN_K]:
        assert ask(p.url, q[None], ATTACKER)[0] == "ok"
    store = p.server.runner.stores["sd"][1]
    stage.pop("threshold")  # the bundle's calibrated one
    path.write_text(yaml.safe_dump({"bundle": str(knn_bundle), "pipeline": {"stages": [stage]}}))
    summary = p.call(p.server.reload())
    assert summary["thresholds"]["sd"] == fitted
    assert p.server.runner.stores["sd"][1] is store
    status, message = ask(p.url, stream[KNN_K][None], ATTACKER)  # its k nearest were sent before the reload
    assert status == "StatusCode.PERMISSION_DENIED" and "stage sd" in message, (status, message)
