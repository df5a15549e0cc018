"""Stateful detectors: defenses that see each client's stream of queries (DESIGN.md, "Stateful
stages see the stream"). ``Blacklight`` is the first; the stores hold the bounded histories.

The names below are imported when first used (PEP 562), so that importing a submodule that needs
no torch (the stores, the store service of defenses/stateful/remote.py, which ``robustgate serve``'s
supervisor runs) does not import the detectors and torch with this package.
"""

from __future__ import annotations

import importlib

_HOMES = {"StatefulDetector": "base", "Blacklight": "blacklight", "HistoryStore": "store", "MemoryStore": "store",
          "RedisStore": "store", "build_store": "store"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
