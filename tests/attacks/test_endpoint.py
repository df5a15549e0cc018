"""Black-box through the live proxy: a real grpc.aio ProxyServer on loopback, queried with
tritonclient.grpc only. Rejections arrive as PERMISSION_DENIED and count as failed queries;
`robustgate probe` reports accepted / rejected / correct counts."""

import asyncio
import threading

import pytest
import torch

from robustgate.attacks.endpoint import GrpcOracle
from robustgate.attacks.probe import probe
from robustgate.attacks.square import SquareLinf
from robustgate.attacks.threat import check_perturbation
from robustgate.proxy.config import load_config
from robustgate.proxy.serve import build_server


class Proxy:
    """A real ProxyServer on 127.0.0.1 free ports, its event loop in a daemon thread."""

    def __init__(self, bundle, stages, server=None):
        cfg = load_config(None, environ={}, overrides={
            "bundle": str(bundle), "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, **(server or {})},
            "pipeline": {"stages": stages},
        })
        self.server = build_server(cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.url = f"127.0.0.1:{port}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture()
def guarded_proxy(tiny_bundle, hf_threshold):
    p = Proxy(tiny_bundle, [{"name": "hf", "kind": "attacks_test_hf", "action": "reject", "threshold": hf_threshold}])
    yield p
    p.stop()


def test_square_through_grpc_counts_rejections(guarded_proxy, tiny, fmnist_splits):
    x, y = fmnist_splits.test_x[100:108], fmnist_splits.test_y[100:108]
    oracle = GrpcOracle(guarded_proxy.url, tiny.name)
    try:
        # a noisy image trips the detector: the attacker gets PERMISSION_DENIED, no logits
        noisy = (x[:1] + 0.3 * torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        logits, rejected = oracle(torch.cat([x[:2], noisy]))
        assert rejected.tolist() == [False, False, True]
        assert torch.isnan(logits[2]).all() and torch.isfinite(logits[:2]).all()
        attack = SquareLinf(oracle, eps=0.15, queries=15, seed=0)
        adv = attack(x, y)
        check_perturbation(adv, x, "linf", 0.15)
        assert oracle.queries == 3 + int(attack.queries_used.sum())  # every query went over gRPC
        assert oracle.rejections >= 1
    finally:
        oracle.close()


def test_probe_reports_counts(guarded_proxy, tiny_bundle, tiny):
    counts = probe(guarded_proxy.url, str(tiny_bundle), n=12, eps=0.2, steps=5)
    clean, attacked = counts["clean"], counts["pgd eps=0.2"]
    for c in (clean, attacked):
        assert c["sent"] == 12 and c["accepted"] + c["flagged"] + c["rejected"] == 12
        assert c["correct"] <= c["accepted"] + c["flagged"]
    assert clean["correct"] >= 6  # the tiny model is ~80% accurate and the detector lets most clean images through
    assert attacked["rejected"] > clean["rejected"]  # l-inf noise at 0.2 trips the high-frequency detector


def test_probe_cli_prints_the_table(guarded_proxy, tiny_bundle, capsys):
    from robustgate.proxy.cli import main

    rc = main(["probe", "--url", guarded_proxy.url, "--bundle", str(tiny_bundle), "--n", "4", "--steps", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "accepted" in out and "rejected" in out and out.count("\n") >= 3
    assert main(["probe", "--url", guarded_proxy.url, "--bundle", str(tiny_bundle.parent / "missing"), "--n", "2"]) == 2


def test_probe_reaches_a_proxy_with_mutual_tls_and_a_bearer_token(tiny_bundle, pki, tmp_path, capsys):
    """The secure deployment (server.tls with client certificates, server.auth): the probe brings them
    with --tls-ca/--tls-cert/--tls-key and --token-file; without the token the proxy refuses it, and
    flags that cannot work are refused before anything is sent."""
    from robustgate.proxy.cli import main

    token = tmp_path / "token"
    token.write_text("s3cret-for-probe\n")
    proxy = Proxy(tiny_bundle, [], server={
        "host": "localhost", "auth": {"bearer_token_file": str(token)},
        "tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key"), "client_ca": str(pki / "ca.pem"),
                "require_client_cert": True}})
    url = "localhost:" + proxy.url.rsplit(":", 1)[1]
    tls = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    base = ["probe", "--url", url, "--bundle", str(tiny_bundle), "--n", "2", "--steps", "1"]
    try:
        assert main([*base, *tls, "--token-file", str(token)]) == 0
        assert "accepted" in capsys.readouterr().out
        assert main([*base, *tls]) == 1  # no token: UNAUTHENTICATED
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main([*base, "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem")]) == 2
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
        assert main([*base, *tls, "--token-file", str(tmp_path / "missing")]) == 2
        assert "--token-file: file" in capsys.readouterr().err
    finally:
        proxy.stop()


def test_eval_sends_square_to_the_live_proxy(guarded_proxy, tiny, backbone, hf_threshold, tmp_path):
    from robustgate.attacks.runner import EvalSettings, Evaluation, NamedPipeline
    from robustgate.defenses.assemble import PipelineConfig

    guarded = NamedPipeline("guarded", PipelineConfig(stages=[{"name": "hf", "kind": "attacks_test_hf", "action": "reject",
                                                               "threshold": hf_threshold}]))
    settings = EvalSettings(attacks=["square"], eps=[0.1], n=4, queries=5, url=guarded_proxy.url,
                            url_config="guarded", model_name=tiny.name)
    result = Evaluation(tiny, [NamedPipeline("none", PipelineConfig()), guarded], settings, tmp_path / "r", backbone=backbone,
                        progress=False, surface_points=0).run()
    oracles = {c["config"]: c["oracle"] for c in result["cells"]}
    assert oracles == {"none": "local served pipeline", "guarded": f"grpc://{guarded_proxy.url}"}
