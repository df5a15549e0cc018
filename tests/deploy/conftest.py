"""Shared by the deploy tests: the metric contract (COMMON.md, "Prometheus metric names"), PromQL
name extraction (rules and dashboards are checked against the same list), and a bundle with a
fitted MagNet detector (the k8s pipeline's stage, and the live Prometheus test's detector)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The fitted detector's name in a bundle = the pipeline stage name (deploy/k8s/base/robustgate.yaml).
MAGNET_STAGE = "magnet_l1"

# name -> type, exactly as COMMON.md fixes them (proxy/metrics.py implements them).
METRICS = {
    "robustgate_requests_total": "counter",
    "robustgate_items_total": "counter",
    "robustgate_rejections_total": "counter",
    "robustgate_detector_score": "histogram",
    "robustgate_stage_duration_seconds": "histogram",
    "robustgate_request_duration_seconds": "histogram",
    "robustgate_batch_size": "histogram",
    "robustgate_queue_depth": "gauge",
    "robustgate_upstream_errors_total": "counter",
    "robustgate_stage_failures_total": "counter",
    "robustgate_auth_failures_total": "counter",
    "robustgate_reloads_total": "counter",
    "robustgate_build_info": "gauge",
    "robustgate_backend_info": "gauge",  # issue 24: the backbone's runtime (kind, device, provider)
    # issue 22: per-client refusals and the stateful stages
    "robustgate_clients_blocked_total": "counter",
    "robustgate_queries_refused_total": "counter",
    "robustgate_limit_store_errors_total": "counter",  # limits.per_client.store kind redis unreachable
    "robustgate_stateful_detections_total": "counter",
    "robustgate_stateful_observe_duration_seconds": "histogram",
    "robustgate_stateful_entries": "gauge",
    "robustgate_stateful_clients": "gauge",
    "robustgate_stateful_bytes": "gauge",
}


def series_names() -> set[str]:
    """Every series name a scrape of the proxy can hold (histograms expand to three)."""
    names = set()
    for name, kind in METRICS.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def promql_series(expr: str) -> set[str]:
    """Metric names an expression selects: robustgate_* identifiers and recording-rule names
    (level:metric:operation). Label names, functions and keywords match neither."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values never count
    return set(re.findall(r"\b(robustgate_[A-Za-z0-9_]+|[a-z_]+:robustgate_[A-Za-z0-9_:]+)\b", expr))


@pytest.fixture(scope="session")
def contract_series() -> set[str]:
    return series_names()


@pytest.fixture(scope="session")
def promql():
    return promql_series


@pytest.fixture(scope="session")
def magnet_stage() -> str:
    return MAGNET_STAGE


@pytest.fixture(scope="session")
def magnet_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with a MagNet detector (stage name MAGNET_STAGE, L1 criterion, autoencoder II)
    fitted and calibrated to a 1% false-positive rate by the real `robustgate fit` command."""
    pytest.importorskip("robustgate.defenses.cli", reason="`robustgate fit` (defenses/cli.py) is not in this tree yet")
    out = tmp_path_factory.mktemp("magnet") / "bundle"
    shutil.copytree(tiny_bundle, out)
    cmd = [sys.executable, "-m", "robustgate.proxy.cli", "fit", "--bundle", str(out), "--defense", "magnet",
           "--name", MAGNET_STAGE, "--params", "criterion=l1", "arch=II", "epochs=3", "--target-fpr", "0.01",
           "--n-train", "2000", "--n-val", "1000", "--n-test", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
