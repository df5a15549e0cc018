"""The ``stateful`` pipeline stage: a stateful detector found in the defense registry by kind.

``kind: stateful`` with ``params: {method: ..., ...}`` builds :class:`Stateful`, which stands for one
of two similarity methods behind the same interface (defenses/stateful/base.py):

- ``method: blacklight`` (default; ``quantization, window, stride, top_k``): Blacklight's content
  fingerprints (defenses/stateful/blacklight.py), no fitted model;
- ``method: knn`` (``k, dim, width, steps, ...``): a learned similarity encoder with k-NN scoring
  (Chen, Carlini & Wagner 2020; defenses/stateful/knn.py), whose encoder ``robustgate fit --defense
  stateful --params method=knn`` trains into the bundle.

``Stateful(method=..., ...)`` returns an instance of the method's class (:class:`StatefulBlacklight`
or :class:`StatefulKnn`, both subclasses of :class:`Stateful`), so ``config()`` and
``build("stateful", **config)`` round-trip each method's own keyword arguments. The store is not a
parameter: the assembly builds it once from the stage's ``store:`` section
(``defenses.stateful.store.store_for`` picks the store class the method needs) and hands the same
object to every rebuilt stage (defenses/assemble.py, ``build_stages(stores=...)``), so a config
reload keeps the clients' histories and blocks.

How the pipeline runs it (defenses/pipeline.py): each item's client identity travels with it; the
batch's items are encoded in one ``encode`` call and observed in one ``observe_groups`` call, each
client's items in order, clients in arrival order; a client already blocked
(``store.blocked_until``) is not observed again until its block ends.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from robustgate.defenses.base import register
from robustgate.defenses.stateful.base import StatefulDetector
from robustgate.defenses.stateful.blacklight import Blacklight
from robustgate.defenses.stateful.knn import KnnDetector
from robustgate.defenses.stateful.store import HistoryStore

METHODS = ("blacklight", "knn")


@register
class Stateful(StatefulDetector):
    """The registered stateful stage (module docstring). ``observe(client, x [N, C, H, W])`` ->
    ``[N]`` float32 scores; flagged when ``score > threshold``."""

    kind: ClassVar[str] = "stateful"

    def __new__(cls, method: str = "blacklight", **kwargs: Any):
        if cls is Stateful:
            if method not in METHODS:
                raise ValueError(f"method must be one of {METHODS}, got {method!r}")
            cls = {"blacklight": StatefulBlacklight, "knn": StatefulKnn}[method]
        return super().__new__(cls)


def _check_method(method: str, want: str) -> None:
    if method != want:
        raise ValueError(f"method must be {want!r} for this class, got {method!r}")


class StatefulBlacklight(Stateful, Blacklight):
    """``kind: stateful, method: blacklight`` (defenses/stateful/blacklight.py)."""

    def __init__(self, method: Literal["blacklight"] = "blacklight", quantization: int = 50, window: int = 20,
                 stride: int = 1, top_k: int = 20, threshold: float | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), store: HistoryStore | None = None):
        _check_method(method, "blacklight")
        self.method = method
        super().__init__(quantization=quantization, window=window, stride=stride, top_k=top_k,
                         threshold=threshold, value_range=tuple(value_range), store=store)


class StatefulKnn(Stateful, KnnDetector):
    """``kind: stateful, method: knn`` (defenses/stateful/knn.py)."""

    def __init__(self, method: Literal["knn"] = "knn", k: int = 4, dim: int = 32, width: int = 16, steps: int = 6000,
                 batch_size: int = 128, lr: float = 2e-3, margin: float = 1.0, eps: float = 0.1,
                 p_benign: float = 0.0, p_attack: float = 1.0, seed: int = 0, statistic: str = "kth",
                 max_side: int = 64, window: int | None = 256, threshold: float | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), store: HistoryStore | None = None):
        _check_method(method, "knn")
        self.method = method
        super().__init__(k=k, dim=dim, width=width, steps=steps, batch_size=batch_size, lr=lr, margin=margin,
                         eps=eps, p_benign=p_benign, p_attack=p_attack, seed=seed, statistic=statistic,
                         max_side=max_side, window=window, threshold=threshold,
                         value_range=tuple(value_range), store=store)


