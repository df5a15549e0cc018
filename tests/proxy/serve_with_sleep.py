"""`robustgate` with one extra test-only defense registered: a purifier that sleeps, so that the
SIGTERM test can hold requests in flight in a real `robustgate serve` subprocess.

Usage: python tests/proxy/serve_with_sleep.py serve --config FILE ...
"""

import sys
import time

from robustgate.defenses.base import Purifier, register
from robustgate.proxy.cli import main


@register
class SleepPurifier(Purifier):
    kind = "test_proxy_sleep"

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def purify(self, x, generator=None):
        time.sleep(self.seconds)
        return x


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
