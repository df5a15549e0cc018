"""The endpoint red team against a real proxy on loopback (tritonclient over gRPC): ART's Square and
HopSkipJump, the stateful-defense adaptations, the transfer attack and the benign streams, with the
query accounting checked against what the server itself received.

The server side is the real ProxyServer (tests/helpers/loopback.py); its bearer-auth interceptor is
replaced, for these tests only, by a subclass that records each ModelInfer's client identity (what a
stateful stage keys on) and can refuse a client after ``block_after`` calls the way a block does
(PERMISSION_DENIED, not naming an item) -- the stateful detector itself is another module. A small
test-local stateful detector (``redteam_test_memory``: counts near neighbours in its history)
gives real stage rejections.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import grpc
import pytest
import torch
from loopback import LoopbackProxy

from robustgate.attacks.benign import run_benign_streams, stream
from robustgate.attacks.channel import Channel
from robustgate.attacks.endpoint import EXHAUSTED_STATUS, REJECTED_STATUS, GrpcOracle, classify_refusal
from robustgate.attacks.endpoint_redteam import (
    Attacker, EndpointSettings, Ledger, Transform, identity_headers, run_cell, run_endpoint_matrix, run_query_attack,
)
from robustgate.defenses import base as defenses_base
from robustgate.defenses.base import Detector, register
from robustgate.proxy import server as server_module

HEADER = "x-client-id"
INFER = "/inference.GRPCInferenceService/ModelInfer"


class MemoryDetector(Detector):
    """Test-only stateful detector: score = how many of the last 256 queries lie within l2
    ``radius`` of this one (exact repeats excluded: retries are not evidence)."""

    kind: ClassVar[str] = "redteam_test_memory"

    def __init__(self, threshold: float | None = None, radius: float = 2.0):
        super().__init__(threshold)
        self.radius = radius
        self.history: list[torch.Tensor] = []

    def score(self, x, classifier=None):  # [N, C, H, W] -> [N]
        out = torch.zeros(len(x))
        for i, item in enumerate(x.flatten(1)):
            if self.history:
                d = (torch.stack(self.history) - item).norm(dim=1)
                out[i] = float(((d > 1e-6) & (d < self.radius)).sum())
            self.history = (self.history + [item.clone()])[-256:]
        return out


class RecordingAuth(grpc.aio.ServerInterceptor):
    """A server interceptor (added to the proxy's gRPC server by the ``recording`` fixture),
    recording the identity header of every ModelInfer and refusing a client after
    ``block_after`` of them (None: never)."""

    seen: ClassVar[list[str | None]] = []
    block_after: ClassVar[int | None] = None

    async def intercept_service(self, continuation, details):
        if details.method == INFER:
            who = dict(details.invocation_metadata or ()).get(HEADER)
            RecordingAuth.seen.append(who)
            limit = RecordingAuth.block_after
            if limit is not None and sum(s == who for s in RecordingAuth.seen) > limit:
                async def blocked(request, context):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"client {who} blocked for 60 s")

                handler = await continuation(details)
                return grpc.unary_unary_rpc_method_handler(blocked, handler.request_deserializer,
                                                           handler.response_serializer)
        return await continuation(details)


@pytest.fixture(autouse=True)
def memory_detector():
    register(MemoryDetector)
    yield
    defenses_base._REGISTRY.pop(MemoryDetector.kind, None)  # no public unregister in the contract


@pytest.fixture()
def recording(monkeypatch):
    RecordingAuth.seen = []
    RecordingAuth.block_after = None
    real = grpc.aio.server

    def server_with_recorder(*args, interceptors=None, **kwargs):  # the proxy installs none without auth
        return real(*args, interceptors=[RecordingAuth(), *(interceptors or ())], **kwargs)

    monkeypatch.setattr(server_module.grpc.aio, "server", server_with_recorder)
    return RecordingAuth


@pytest.fixture()
def start(recording, tiny_bundle):
    started = []

    def run(stages: list[dict], verdict_mode: str = "request") -> LoopbackProxy:
        p = LoopbackProxy(tiny_bundle, {"stages": stages, "verdict_mode": verdict_mode})
        started.append(p)
        return p

    yield run
    for p in started:
        p.stop()


STATEFUL = [{"name": "stateful", "kind": "redteam_test_memory", "action": "reject", "threshold": 2.5}]


@pytest.fixture(scope="module")
def images(fmnist_splits):
    x, y = fmnist_splits.take("test", 40, 200)
    return x[:4], y[:4], x[8:40]  # attacked images, labels, a disjoint benign pool


def test_refusals_are_classified_from_status_and_message():
    r = classify_refusal(REJECTED_STATUS, "rejected by robustgate: item 0 stage stateful score 3 threshold 2.5")
    assert (r.outcome, r.stage, r.refused) == ("rejected", "stateful", True)
    # a stage that failed under fail-closed: refused, but no detection by that stage
    assert classify_refusal(REJECTED_STATUS, "rejected by robustgate: item 2 stage hf failed").stage == "hf failed"
    assert classify_refusal(REJECTED_STATUS, "client a blocked for 60 s").outcome == "blocked"
    assert classify_refusal(EXHAUSTED_STATUS, "query budget spent; stage stateful").stage == "stateful"
    assert classify_refusal(EXHAUSTED_STATUS, "queue full: 9 items waiting, retry later") is None
    assert classify_refusal("StatusCode.INVALID_ARGUMENT", "bad shape") is None
    lg = Ledger(x0=torch.zeros(1, 2, 2), y=0, eps=0.1, budget=3, detection_stages=frozenset({"stateful"}))
    for reply in (classify_refusal(REJECTED_STATUS, "rejected by robustgate: item 0 stage hf score 1 threshold 0"),
                  classify_refusal(REJECTED_STATUS, "rejected by robustgate: item 0 stage stateful failed"),
                  classify_refusal(REJECTED_STATUS, "rejected by robustgate: item 0 stage stateful score 3 threshold 2")):
        lg.charge()
        lg.record(torch.zeros(1, 2, 2), reply)
    # neither the hf rejection nor the stateful stage's failure is a stateful detection; the third is
    assert lg.first_detection == 3 and lg.stages == {"hf": 1, "stateful failed": 1, "stateful": 1}
    with pytest.raises(ValueError, match="attacks: unknown endpoint attack 'square-fast'"):
        EndpointSettings(url="x", model="m", attacks=["square-fast"])
    for bad in ((0, 10), (20, 10), (5,)):
        with pytest.raises(ValueError, match="hsj_evals: need"):
            EndpointSettings(url="x", model="m", hsj_evals=bad)


@pytest.mark.parametrize("attack,budget", [("square", 150), ("hopskipjump", 150)])
def test_query_attacks_account_for_every_query(start, recording, images, tiny, attack, budget):
    proxy = start([])
    x, y, benign = images
    s = EndpointSettings(url=proxy.url, model=tiny.name, attacks=[attack], budgets=[budget], eps=0.15)
    cell = run_cell(s, attack, budget, x, y, benign, classes=len(tiny.classes), progress=False)
    m, items = cell["metrics"], cell["items"]
    assert len(recording.seen) == m["attack_queries"] == sum(i["queries"] for i in items)  # the server's own count
    for i in items:
        assert 1 <= i["queries"] <= budget
        assert i["queries"] == (budget if i["success_at"] is None else i["success_at"])  # stopped by either
        assert i["first_detection"] is None and i["outcomes"].get("rejected", 0) == 0  # nothing to detect here
    assert 0.0 <= m["robust_accuracy"] <= 1.0
    assert m["robust_accuracy"] == 1 - sum(i["success_at"] is not None for i in items) / len(items)
    assert m["detected_share"] == 0.0
    assert cell["threat_model"]["queries"] == budget and cell["threat_model"]["target"] == "endpoint"
    assert cell["threat_model"]["answers_seen"] == ("label" if attack == "hopskipjump" else "scores")
    if attack == "square":
        assert m["attack_success_rate"] > 0  # the tiny model is not robust at eps 0.15
        assert cell["threat_model"]["p_init"] == s.p_init
    else:
        assert cell["threat_model"]["hsj_evals"] == {"init_eval": 100, "max_eval": 1000}


@pytest.mark.parametrize("verdict_mode", ["request", "item"])
def test_stateful_rejections_are_detections(start, recording, images, tiny, verdict_mode):
    proxy = start(STATEFUL, verdict_mode)
    x, y, benign = images
    s = EndpointSettings(url=proxy.url, model=tiny.name, attacks=["square"], budgets=[60], eps=0.15)
    cell = run_cell(s, "square", 60, x[:3], y[:3], benign, classes=len(tiny.classes), progress=False)
    m = cell["metrics"]
    assert m["rejections_by_stage"].get("stateful", 0) >= 1 and m["detected_share"] > 0
    assert m["queries_to_first_detection"] == sorted(i["first_detection"] for i in cell["items"]
                                                     if i["first_detection"] is not None)
    before = sum(i["success_at"] is not None and (i["first_detection"] is None or i["success_at"] < i["first_detection"])
                 for i in cell["items"])
    assert m["completed_before_detection_share"] == before / 3
    assert len(recording.seen) == m["attack_queries"]
    # the same rejections are not detections when the stage is not named a detection stage
    s2 = EndpointSettings(url=proxy.url, model=tiny.name, attacks=["square"], budgets=[30], eps=0.15,
                          detection_stages=["other"])
    cell2 = run_cell(s2, "square", 30, x[3:], y[3:], benign, classes=len(tiny.classes), progress=False)
    assert cell2["metrics"]["outcomes"].get("rejected", 0) >= 1 and cell2["metrics"]["detected_share"] == 0.0


def test_a_block_is_a_detection_and_ends_the_attack(start, recording, images, tiny):
    proxy = start([])
    recording.block_after = 7
    x, y, _ = images
    oracle = GrpcOracle(proxy.url, tiny.name, headers={HEADER: "blocked-one"})
    try:
        ledger = run_query_attack("hopskipjump", Attacker([oracle]), x[0], int(y[0]), 0.15, 100, len(tiny.classes),
                                  frozenset({"stateful"}))
    finally:
        oracle.close()
    assert ledger.blocked and ledger.first_detection == 8 and ledger.queries == 8  # stops after the block
    assert ledger.outcomes["blocked"] == 1 and oracle.queries == 8 == len(recording.seen)


def test_sybil_identities_reach_the_server_as_distinct_clients(start, recording, images, tiny):
    proxy = start([])
    x, y, benign = images
    s = EndpointSettings(url=proxy.url, model=tiny.name, attacks=["square-sybil"], budgets=[20], eps=0.05,
                         sybil_identities=4)
    cell = run_cell(s, "square-sybil", 20, x[:2], y[:2], benign, classes=len(tiny.classes), progress=False)
    assert cell["threat_model"]["identities"] == 4
    seen = Counter(recording.seen)
    assert sum(seen.values()) == cell["metrics"]["attack_queries"]
    for item in range(2):  # each image's campaign: 4 identities, round-robin
        mine = {k: v for k, v in seen.items() if k.startswith(f"attacker{item}-")}
        assert len(mine) == min(4, cell["items"][item]["queries"])
        assert max(mine.values()) - min(mine.values()) <= 1
    assert identity_headers(2, tokens=["t1", "t2"]) == [{"authorization": "Bearer t1"}, {"authorization": "Bearer t2"}]
    with pytest.raises(ValueError, match="3 identities need 3 bearer tokens"):
        identity_headers(3, tokens=["t1"])


def test_spacing_and_transform_adaptations(start, recording, images, tiny):
    proxy = start(STATEFUL)
    x, y, benign = images
    s = EndpointSettings(url=proxy.url, model=tiny.name, attacks=["square-spacing", "square-transform"], budgets=[25],
                         eps=0.15, benign_per_query=2, transform=Transform(brightness=0.05, noise=0.05, resample=2))
    spaced = run_cell(s, "square-spacing", 25, x[:2], y[:2], benign, classes=len(tiny.classes), progress=False)
    m = spaced["metrics"]
    assert m["benign_spacing_queries"] == 2 * m["attack_queries"]  # two benign queries before each attack query
    assert len(recording.seen) == 3 * m["attack_queries"]
    assert spaced["threat_model"]["spacing"] == {"benign_per_query": 2, "wait_s": 0.0}
    recording.seen.clear()
    moved = run_cell(s, "square-transform", 25, x[:2], y[:2], benign, classes=len(tiny.classes), progress=False)
    assert len(recording.seen) == moved["metrics"]["attack_queries"] and all(
        i["queries"] <= 25 for i in moved["items"])  # resampled queries are charged too
    assert moved["threat_model"]["transform"]["resample"] == 2


def test_transfer_and_the_matrix_report(start, recording, images, tiny, backbone, tmp_path):
    proxy = start([])
    x, y, benign = images
    s = EndpointSettings(url=proxy.url, model=tiny.name, attacks=["square", "transfer"], budgets=[10, 20], eps=0.2,
                         transfer_steps=10, channel=Channel(token="tok-never-in-a-report"))
    result = run_endpoint_matrix(s, x, y, len(tiny.classes), benign[:9], surrogate=backbone, benign_clients=3,
                                 out=str(tmp_path), command="test", progress=False)
    by = {(c["attack"], c["budget"]): c for c in result["cells"]}
    assert set(by) == {("square", 10), ("square", 20), ("transfer", 1)}
    t = by[("transfer", 1)]["metrics"]
    assert t["attack_queries"] == len(x)  # sent once
    assert t["attack_success_rate"] >= 0.5  # the surrogate is the served model's own twin: transfer is white-box here
    b = result["benign"]
    assert {k: v["queries"] for k, v in b.items()} == {"shuffled": 9, "retries": 27, "near_duplicates": 36}
    assert all(v["refused_share"] == 0.0 and v["clients_ever_blocked_share"] == 0.0 for v in b.values())
    md = (tmp_path / "results.md").read_text()
    assert "| transfer |" in md and "## Benign streams" in md and "linf ε=0.2, 20 queries/image" in md
    assert (tmp_path / "results.json").exists()
    # the report says a token was used, never which
    assert result["settings"]["channel"] == {"tls": False, "client_certificate": False, "bearer_token": True}
    assert "tok-never-in-a-report" not in (tmp_path / "results.json").read_text() + md


def test_benign_streams_count_detections_per_client(start, recording, images, tiny):
    proxy = start(STATEFUL)
    _, _, benign = images
    out = run_benign_streams(proxy.url, tiny.name, benign[:6], clients=2, detection_stages=["stateful"],
                             streams=["retries", "near_duplicates"], progress=False)
    assert out["retries"]["detected_share"] == 0.0  # exact retries are not near neighbours to this detector
    nd = out["near_duplicates"]
    assert 0.0 <= nd["detected_share"] <= nd["refused_share"] <= 1.0
    assert nd["clients_ever_detected_share"] in (0.0, 0.5, 1.0)
    assert set(Counter(recording.seen)) == {"benign-retries-0", "benign-retries-1", "benign-near_duplicates-0",
                                            "benign-near_duplicates-1"}
    q = stream("near_duplicates", benign[:4], variants=3)
    assert q.shape == (16, *benign.shape[1:]) and float(q.min()) >= 0 and float(q.max()) <= 1


def test_cli_entry_runs_the_matrix(start, recording, tiny, tiny_bundle, tmp_path):
    import argparse

    from robustgate.attacks import cli as eval_cli
    from robustgate.attacks.endpoint_cli import run_endpoint

    proxy = start([])
    parser = argparse.ArgumentParser()  # robustgate eval's own parser
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["--threat", "endpoint", "--url", proxy.url, "--bundle", str(tiny_bundle), "--out",
                              str(tmp_path), "--attacks", "square,hopskipjump-sybil", "--eps", "0.1", "--queries", "5,8",
                              "--n", "2", "--offset", "300", "--sybil-identities", "2", "--benign-n", "4",
                              "--benign-clients", "2", "--hsj-evals", "5", "50", "--no-progress"])
    assert eval_cli.run(args) == 0
    assert args.surrogate is None
    import json

    result = json.loads((tmp_path / "results.json").read_text())
    assert [(c["attack"], c["budget"]) for c in result["cells"]] == [
        ("square", 5), ("square", 8), ("hopskipjump-sybil", 5), ("hopskipjump-sybil", 8)]
    assert result["cells"][2]["threat_model"]["hsj_evals"] == {"init_eval": 5, "max_eval": 50}
    assert len(recording.seen) == sum(c["metrics"]["attack_queries"] for c in result["cells"]) + sum(
        b["queries"] for b in result["benign"].values())
    args.url = None
    assert run_endpoint(args) == 2
    args.url, args.n = proxy.url, 10**6
    assert run_endpoint(args) == 2  # more images than the test split holds: one clear error


def test_a_cell_is_reproducible_under_its_seed(start, recording, images, tiny):
    proxy = start([])
    x, y, benign = images
    s = EndpointSettings(url=proxy.url, model=tiny.name, attacks=["square"], budgets=[200], eps=0.2, seed=3)
    runs = [run_cell(s, "square", 200, x, y, benign, classes=len(tiny.classes), progress=False)["items"]
            for _ in range(2)]
    assert any(i["success_at"] is not None for i in runs[0])  # some succeed, at a query the seed decides
    assert runs[0] == runs[1]  # fails without the per-image seed (checked by removing it)
