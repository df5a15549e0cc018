"""Stateful detectors: defenses that see each client's stream of queries (DESIGN.md, "Stateful
stages see the stream"). ``Blacklight`` is the first; the stores hold the bounded histories."""

from robustgate.defenses.stateful.base import StatefulDetector
from robustgate.defenses.stateful.blacklight import Blacklight
from robustgate.defenses.stateful.store import HistoryStore, MemoryStore, RedisStore, build_store

__all__ = ["Blacklight", "HistoryStore", "MemoryStore", "RedisStore", "StatefulDetector", "build_store"]
