"""Writes deploy/prometheus/prometheusrule.yaml (Prometheus Operator) from robustgate.rules.yml.

The rules live once, in robustgate.rules.yml (what promtool checks and tests); the operator's
PrometheusRule carries the same groups. A test fails when the two differ:

    .venv/bin/python deploy/prometheus/gen_prometheusrule.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "robustgate.rules.yml"
OUT = HERE / "prometheusrule.yaml"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as `|` blocks, as in the source file."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "robustgate", "labels": {"app.kubernetes.io/name": "robustgate"}},
        "spec": {"groups": groups},
    }
    header = "# Generated from robustgate.rules.yml by gen_prometheusrule.py; do not edit.\n"
    return header + yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=120)


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
