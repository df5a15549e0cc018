"""The ``stateful`` pipeline stage: a stateful detector found in the defense registry by kind.

``kind: stateful`` with ``params: {method: blacklight, quantization, window, stride, top_k}``
builds :class:`Stateful`, Blacklight's fingerprint matching (defenses/stateful/blacklight.py) under
the registry's name for the stage; ``method`` names the similarity method so that a second one (a
learned encoder with k-NN, Chen, Carlini & Wagner 2020) can stand behind the same kind. The store
is not a parameter: the assembly builds it once from the stage's ``store:`` section and hands the
same object to every rebuilt stage (defenses/assemble.py, ``build_stages(stores=...)``), so a config
reload keeps the clients' histories and blocks.

How the pipeline runs it (defenses/pipeline.py): each item's client identity travels with it; the
batch's items are fingerprinted in one ``encode`` call and observed in one ``observe_groups``
call, each client's items in order, clients in arrival order; a client already blocked
(``store.blocked_until``) is not observed again until its block ends.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from robustgate.defenses.base import register
from robustgate.defenses.stateful.blacklight import Blacklight
from robustgate.defenses.stateful.store import HistoryStore

METHODS = ("blacklight",)


@register
class Stateful(Blacklight):
    """The registered stateful stage (module docstring). ``observe(client, x [N, C, H, W])`` ->
    ``[N]`` float32 scores; flagged when ``score > threshold``."""

    kind: ClassVar[str] = "stateful"

    def __init__(self, method: Literal["blacklight"] = "blacklight", quantization: int = 50, window: int = 20,
                 stride: int = 1, top_k: int = 20, threshold: float | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), store: HistoryStore | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        super().__init__(quantization=quantization, window=window, stride=stride, top_k=top_k,
                         threshold=threshold, value_range=tuple(value_range), store=store)
