"""robustgate serve sets the purifiers' part threads (pipeline.purify_threads; defenses/purify/parts.py)."""

from robustgate.defenses.purify import parts
from robustgate.proxy.config import ProxyConfig
from robustgate.proxy.serve import set_purify_threads
from robustgate.proxy.workers import default_workers


def test_serve_sets_the_configured_purify_threads_or_the_cores():
    try:
        assert set_purify_threads(ProxyConfig(bundle="b", pipeline={"purify_threads": 3})) == 3
        assert parts.get_threads() == 3
        assert set_purify_threads(ProxyConfig(bundle="b")) == default_workers() == parts.get_threads()
    finally:
        parts.set_threads(1)
