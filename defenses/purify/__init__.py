"""Purifiers: map an input back towards clean data before the classifier sees it.

Importing this package registers every purifier kind: ``jpeg``, ``noise``, ``bitdepth``,
``median``, ``diffusion``.
"""

from robustgate.defenses.purify import bitdepth, diffusion, jpeg, median, noise  # noqa: F401
