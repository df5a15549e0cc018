"""deploy/prometheus: rules checked and unit-tested by promtool, scrape config and ServiceMonitor
pointing at the Service that exists, the operator's PrometheusRule current."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import front  # tests/helpers (pytest pythonpath): the native front's exporter series

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "robustgate.rules.yml"
RULE_TESTS = PROM / "robustgate.rules.test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def test_promtool_check_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path):
    broken = RULES.read_text().replace("> 0.05", "> > 0.05", 1)
    (tmp_path / "r.yml").write_text(broken)
    proc = promtool("check", "rules", str(tmp_path / "r.yml"))
    assert proc.returncode != 0 and "parse error" in (proc.stdout + proc.stderr)


def test_promtool_unit_tests_pass():
    proc = promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_unit_tests_fail_when_a_threshold_is_weakened(tmp_path):
    # The attack test must depend on the threshold: at 20% the 16.7% attack no longer fires.
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(") > 0.05", ") > 0.20", 1))
    suite = yaml.safe_load(RULE_TESTS.read_text())
    suite["tests"] = [t for t in suite["tests"]
                      if any(c["alertname"] == "RobustgateAttackSuspected" for c in t.get("alert_rule_test", []))]
    (tmp_path / RULE_TESTS.name).write_text(yaml.safe_dump(suite))
    proc = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0 and "alertname: RobustgateAttackSuspected" in proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for alert in alerts():
        name = alert["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no unit test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no unit test where it stays quiet"


def test_alerts_carry_severity_summary_and_a_runbook_section():
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    for alert in alerts():
        assert alert["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"])
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == alert["alert"].lower()
        assert anchor in headings, f"docs/OPERATIONS.md has no '### {alert['alert']}' runbook"


def test_rules_use_only_contract_metrics_and_defined_recordings(contract_series, promql):
    """robustgate's own metrics contract, plus the front's exporter series that
    tests/hardening/test_front.py reads from a real HAProxy (front.SERIES)."""
    recorded = {r["record"] for r in rules() if "record" in r}
    seen = set()
    for rule in rules():
        names = promql(rule["expr"])
        seen |= names
        unknown = names - contract_series - front.SERIES - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown series {unknown}"
    assert recorded <= seen, f"recording rules nobody reads: {recorded - seen}"


def test_scrape_config_is_valid_and_targets_the_metrics_port():
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    job = config["scrape_configs"][0]
    services = {s["metadata"]["name"]: s for s in yaml.safe_load_all((ROOT / "deploy/k8s/base/service.yaml").read_text())}
    proxy = yaml.safe_load((ROOT / "deploy/k8s/base/robustgate.yaml").read_text())
    (sd,) = job["dns_sd_configs"]
    host = sd["names"][0].split(".")[0]
    assert host in services and services[host]["spec"].get("clusterIP") == "None", "must resolve to pod IPs"
    assert sd["port"] == proxy["server"]["metrics_port"]


def test_service_monitor_selects_the_metrics_port_of_one_service():
    monitor = yaml.safe_load((PROM / "servicemonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = list(yaml.safe_load_all((ROOT / "deploy/k8s/base/service.yaml").read_text()))
    selected = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["robustgate"], "each pod scraped once"
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"} <= ports


def test_prometheusrule_is_generated_from_the_rules_file():
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", PROM / "gen_prometheusrule.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (PROM / "prometheusrule.yaml").read_text() == gen.render(), "run deploy/prometheus/gen_prometheusrule.py"
    resource = yaml.safe_load((PROM / "prometheusrule.yaml").read_text())
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (job) (rate(robustgate_items_total{verdict="rejected"}[5m]))', {"robustgate_items_total"}),
        ("job:robustgate_x:ratio_rate5m > 1", {"job:robustgate_x:ratio_rate5m"}),
        ('up{job="robustgate_not_a_metric"}', set()),
    ],
)
def test_promql_series_extraction(expr, expected, promql):
    assert promql(expr) == expected
