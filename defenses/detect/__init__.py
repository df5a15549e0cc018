"""Detectors: score the raw input, one score per item, calibrated to a clean false-positive rate.

Importing this package registers every detector kind (and MagNet's reformer purifier)."""

from robustgate.defenses.detect import magnet  # noqa: F401
from robustgate.defenses.detect import safetynet  # noqa: F401
