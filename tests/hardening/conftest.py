"""Fixtures of the hardening tests: the proxy test fixtures (tests/proxy/conftest.py: a tiny bundle,
real in-process proxies on loopback, test-local defenses) re-exported, plus the bench campaign
scripts (bench/hardening/) loaded as modules so that the tests run the same code at a small size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_proxy = load("robustgate_tests_proxy_conftest", REPO / "tests" / "proxy" / "conftest.py")
# pytest collects fixtures by name from this module's namespace
test_defenses = _proxy.test_defenses
proxy_bundle = _proxy.proxy_bundle
ort_logits = _proxy.ort_logits
start_proxy = _proxy.start_proxy
launch = _proxy.launch
RunningProxy = _proxy.RunningProxy
proxy_config = _proxy.proxy_config
GatePurifier = _proxy.GatePurifier


@pytest.fixture(scope="session")
def fuzz():
    """bench/hardening/fuzz.py as a module."""
    return load("robustgate_bench_hardening_fuzz", REPO / "bench" / "hardening" / "fuzz.py")
