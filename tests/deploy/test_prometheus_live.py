"""A real Prometheus scraping a real proxy: counters rise with the traffic, the attack alert fires.

Setup, all on loopback with free ports:
- a bundle: the session's tiny Fashion-MNIST CNN with a MagNet detector fitted and calibrated to
  a 1% false-positive rate by the real `robustgate fit` command;
- `robustgate serve` with one MagNet stage (action reject, request verdict mode);
- Debian's `/usr/bin/prometheus` scraping the proxy's metrics port every second and evaluating
  deploy/prometheus/robustgate.rules.yml unchanged, plus a copy of the attack alert with its
  5-minute windows shortened to WINDOW and `for: 0s` (minutes of traffic do not fit in a test).

Traffic goes through tritonclient.grpc, one image per request so that a request is rejected
exactly when its item is: first clean test images, then PGD adversarial examples (eps 0.3,
crafted on the bundle's torch twin). The client's own counts are compared with what
Prometheus reads.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "robustgate.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "robustgate-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
JOB = "robustgate"
WINDOW_S = 10
WINDOW = f"{WINDOW_S}s"
PACE_S = 0.05  # between attack requests: spread over several scrapes, as a real attack is
N_CLEAN, N_ATTACK = 200, 100
STAGE = "magnet_l1"  # the fitted detector (tests/deploy/conftest.py, magnet_bundle)

pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus package is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 0.25):
    """Polls ``check()`` until it returns a truthy value; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Prometheus:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def short_attack_rules(directory: Path) -> Path:
    """The production attack alert with WINDOW for its 5-minute windows and no `for:` delay."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alert = dict(next(r for r in rules if r.get("alert") == "RobustgateAttackSuspected"))
    assert alert["expr"].count("[5m]") == 3
    alert["expr"] = alert["expr"].replace("[5m]", f"[{WINDOW}]")
    alert["for"] = "0s"
    alert["alert"] = "RobustgateAttackSuspectedShortWindow"
    path = directory / "short.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "short", "rules": [alert]}]}))
    return path


@pytest.fixture(scope="module")
def proxy(magnet_bundle, tmp_path_factory):
    """A `robustgate serve` process; yields (grpc port, metrics port, model name)."""
    from robustgate.models.bundle import Bundle

    work = tmp_path_factory.mktemp("proxy")
    config = {
        "bundle": str(magnet_bundle),
        "server": {"host": "127.0.0.1", "port": 0, "metrics_host": "127.0.0.1", "metrics_port": 0, "grace_s": 1},
        "backend": {"kind": "onnxruntime", "onnxruntime": {"device": "cpu", "intra_op_threads": 1, "inter_op_threads": 1}},
        "batching": {"enabled": True, "max_batch_size": 16, "max_queue_delay_ms": 2},
        "pipeline": {"stages": [{"name": STAGE, "kind": "magnet", "action": "reject"}], "verdict_mode": "request"},
    }
    (work / "robustgate.yaml").write_text(yaml.safe_dump(config))
    stderr = open(work / "stderr.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustgate.proxy.cli", "serve", "--config", str(work / "robustgate.yaml")],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("ROBUSTGATE_")}, "OMP_NUM_THREADS": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        banner = None
        while banner is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            banner = re.search(r"serving (\S+) on port (\d+), metrics on port (\d+)", line)
        assert banner, f"proxy did not start (exit {proc.poll()}): {(work / 'stderr.log').read_text()[-3000:]}"
        yield int(banner.group(2)), int(banner.group(3)), banner.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()
    assert Bundle.load(magnet_bundle).defense(STAGE).kind == "magnet"


@pytest.fixture(scope="module")
def prometheus(proxy, tmp_path_factory):
    _grpc_port, metrics_port, _model = proxy
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES), str(short_attack_rules(work))],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prometheus(port)

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}: {(work / 'prometheus.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, "prometheus /-/ready")
        wait_for(lambda: any(t["health"] == "up" for t in prom.get("/api/v1/targets")["activeTargets"]),
                 30, "the proxy target to be up")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def send(grpc_port: int, model: str, images: np.ndarray, pace_s: float = 0.0) -> int:
    """One request per image, ``pace_s`` apart; returns how many were rejected
    (PERMISSION_DENIED). Any other failure fails the test."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    name = client.get_model_metadata(model).inputs[0].name
    rejected = 0
    for x in images:
        time.sleep(pace_s)
        inp = grpcclient.InferInput(name, [1, *x.shape], "FP32")
        inp.set_data_from_numpy(x[None].astype(np.float32))
        try:
            client.infer(model, [inp])
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.PERMISSION_DENIED", exc
            assert "rejected by robustgate" in exc.message() and f"stage {STAGE}" in exc.message()
            rejected += 1
    client.close()
    return rejected


def adversarial(bundle: Path, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """PGD (L-inf, eps 0.3, 10 steps) on the bundle's torch twin: a non-adaptive attack."""
    import torchattacks

    from robustgate.models.twin import load_backbone

    model = load_backbone(bundle)
    attack = torchattacks.PGD(model, eps=0.3, alpha=0.05, steps=10, random_start=True)
    attack.set_normalization_used(mean=[0.0], std=[1.0])
    torch.manual_seed(0)
    return attack(x, y).detach().numpy()


def counter(prom: Prometheus, expr: str) -> float:
    return prom.value(f"sum({expr})") or 0.0


def scraped(prom: Prometheus, expected_requests: int) -> bool:
    return counter(prom, f'robustgate_requests_total{{job="{JOB}"}}') == expected_requests


def test_counters_rise_and_the_attack_alert_fires(proxy, prometheus, magnet_bundle, fmnist_subset, contract_series):
    grpc_port, _metrics_port, model = proxy
    prom = prometheus
    # what the module's proxy answered before this test (0 in file order; another test's traffic otherwise)
    series = {"requests": f'robustgate_requests_total{{job="{JOB}"}}', "items": f'robustgate_items_total{{job="{JOB}"}}',
              "items_rejected": f'robustgate_items_total{{job="{JOB}", verdict="rejected"}}',
              "requests_rejected": f'robustgate_requests_total{{job="{JOB}", outcome="rejected"}}',
              "requests_accepted": f'robustgate_requests_total{{job="{JOB}", outcome="accepted"}}',
              "rejections": f'robustgate_rejections_total{{job="{JOB}", detector="{STAGE}"}}'}
    base = {k: counter(prom, e) for k, e in series.items()}
    assert base["requests"] == base["items"]  # batch-1 requests only

    def grew(name: str) -> float:
        return counter(prom, series[name]) - base[name]

    # 1. Clean traffic: counters follow the client's counts exactly; the alert stays quiet.
    x, y = fmnist_subset("test", N_CLEAN + N_ATTACK)
    clean_rejected = send(grpc_port, model, x[:N_CLEAN].numpy())
    wait_for(lambda: scraped(prom, base["requests"] + N_CLEAN), 30, f"{N_CLEAN} requests in Prometheus")
    assert grew("items") == N_CLEAN
    assert grew("items_rejected") == clean_rejected
    assert grew("requests_rejected") == clean_rejected
    assert grew("rejections") == clean_rejected
    assert clean_rejected / N_CLEAN < 0.05, f"{clean_rejected}/{N_CLEAN} clean images rejected at a 1% target FPR"
    expr = attack_expr()
    assert prom.query(expr) == [], "attack alert expression non-empty on clean traffic"

    clean_end = time.monotonic()

    # 2. Adversarial traffic: the detector rejects it, the counters follow, the alert fires.
    #    It starts once the clean traffic has left the alert's window, and is paced: a
    #    rejections_total{detector} series is born at its first rejection, and what a burst
    #    counts before the first scrape is not seen by rate().
    x_adv = adversarial(magnet_bundle, x[N_CLEAN:], y[N_CLEAN:])
    assert float(np.abs(x_adv - x[N_CLEAN:].numpy()).max()) <= 0.3 + 1e-6
    time.sleep(max(0.0, clean_end + WINDOW_S + 2 - time.monotonic()))
    attack_rejected = send(grpc_port, model, x_adv, pace_s=PACE_S)
    total = N_CLEAN + N_ATTACK
    wait_for(lambda: scraped(prom, base["requests"] + total), 30, f"{total} requests in Prometheus")
    rejected = clean_rejected + attack_rejected
    assert grew("rejections") == rejected
    assert grew("requests_rejected") == rejected
    assert grew("requests_accepted") == total - rejected

    firing = prom.query(expr)
    assert [s["metric"]["detector"] for s in firing] == [STAGE], (
        f"attack alert expression did not fire: {attack_rejected}/{N_ATTACK} adversarial requests rejected")
    ratio = float(firing[0]["value"][1])
    assert ratio > 0.05
    print(f"clean rejected {clean_rejected}/{N_CLEAN}, adversarial rejected {attack_rejected}/{N_ATTACK}, "
          f"alert expression over {WINDOW}: {ratio:.3f}")
    wait_for(lambda: [a for a in prom.get("/api/v1/alerts")["alerts"]
                      if a["labels"]["alertname"] == "RobustgateAttackSuspectedShortWindow"
                      and a["state"] == "firing" and a["labels"]["detector"] == STAGE],
             WINDOW_S, "the short-window attack alert to fire")

    # 3. The scrape holds only contract names (prometheus_client adds `_created` to counters and
    #    histograms), and every production rule evaluates without error on the real series.
    names = {s["metric"]["__name__"] for s in prom.query(f'count by (__name__) ({{job="{JOB}", __name__=~"robustgate_.+"}})')}
    created = {n.removesuffix("_total") + "_created" for n in contract_series if n.endswith("_total")} | {
        n.removesuffix("_bucket") + "_created" for n in contract_series if n.endswith("_bucket")}
    assert names - contract_series - created == set(), "metrics outside the contract"
    for core in ("robustgate_requests_total", "robustgate_items_total", "robustgate_rejections_total",
                 "robustgate_detector_score_bucket", "robustgate_request_duration_seconds_bucket",
                 "robustgate_stage_duration_seconds_bucket", "robustgate_batch_size_bucket",
                 "robustgate_queue_depth", "robustgate_build_info"):
        assert core in names, core
    rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert len(rules) == 1 + sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule


def attack_expr() -> str:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == "RobustgateAttackSuspected")["expr"].replace("[5m]", f"[{WINDOW}]")


def test_dashboard_queries_run_on_live_data(proxy, prometheus, fmnist_subset):
    grpc_port, _metrics_port, model = proxy
    if counter(prometheus, f'robustgate_requests_total{{job="{JOB}"}}') == 0:  # run alone: make traffic
        # paced over several 1 s scrapes: rate() needs two samples of a series that grew between them
        send(grpc_port, model, fmnist_subset("test", 20)[0].numpy(), pace_s=0.25)
        wait_for(lambda: scraped(prometheus, 20), 30, "20 requests in Prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"$__rate_interval": WINDOW, "$job": JOB, "$detector": ".*"}
    empty = []
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in variables.items():
                expr = expr.replace(var, value)
            if not prometheus.query(expr):  # a PromQL error fails inside query()
                empty.append(panel["title"])
    # Only failures that did not happen may be empty.
    assert set(empty) <= {"Upstream errors by code", "Stage failures"}, empty


def test_k8s_probes_ask_a_health_service_the_proxy_serves(proxy):
    """deploy/k8s probes use grpc.health.v1 with their `service` (default ""): the running proxy
    answers SERVING for each, and NOT_FOUND for a service it does not know."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    grpc_port, _metrics_port, _model = proxy
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    sidecar = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "robustgate")
    services = {sidecar[p]["grpc"].get("service", "") for p in ("livenessProbe", "readinessProbe")}
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
