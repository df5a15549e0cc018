"""Ensembles: fan each item out into copies, classify them in one batch, aggregate.

Importing this package registers every ensemble kind: ``tte``, ``smoothing``.
"""

from robustgate.defenses.ensemble import smoothing, tte  # noqa: F401
