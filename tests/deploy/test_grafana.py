"""deploy/grafana: the dashboard is valid JSON, covers what operators need, and every query
parses (promtool) and uses only the metric names of the contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "robustgate-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Grafana's template variables, replaced by values of the same kind before promtool parses them.
VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$detector": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with template variables substituted."""
    out = []
    for panel in panels():
        for t in panel["targets"]:
            expr = t["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] == "robustgate" and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: use the datasource variable"
        assert p["targets"] and all(t["refId"] for t in p["targets"])
        assert p.get("description"), f"{p['title']}: say what the panel shows"
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "detector"} <= names


def test_every_query_uses_only_contract_metrics(contract_series, promql):
    for title, expr in queries():
        names = promql(expr)
        assert names, f"{title}: selects no robustgate metric"
        assert names <= contract_series, f"{title}: unknown series {names - contract_series}"
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            assert promql(var["definition"]) <= contract_series


def test_every_query_parses(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_title, expr) in enumerate(queries())
    ]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries())} rules found" in proc.stdout


@pytest.mark.parametrize(
    ("topic", "series"),
    [
        ("requests by outcome", r"robustgate_requests_total.*by \(outcome\)|by \(outcome\).*robustgate_requests_total"),
        ("rejections by detector", r"by \(detector\) \(rate\(robustgate_rejections_total"),
        ("score distributions", r"robustgate_detector_score_bucket"),
        ("per-stage latency", r"by \(stage, le\) \(rate\(robustgate_stage_duration_seconds_bucket"),
        ("end-to-end latency", r"robustgate_request_duration_seconds_bucket"),
        ("batch sizes", r"robustgate_batch_size_bucket"),
        ("queue depth", r"robustgate_queue_depth"),
        ("upstream errors", r"robustgate_upstream_errors_total"),
    ],
)
def test_dashboard_covers(topic, series):
    assert any(re.search(series, expr) for _title, expr in queries()), f"no panel shows {topic}"
