"""Shared by the deploy tests: the metric contract (COMMON.md, "Prometheus metric names") and
PromQL name extraction, so rules and dashboards are checked against the same list."""

from __future__ import annotations

import re

import pytest

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
    "robustgate_build_info": "gauge",
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
