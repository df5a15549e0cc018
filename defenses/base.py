"""The shared defense interface: one small base class per role, and a registry by name.

Three roles (DESIGN.md, "The defense pipeline"):

- :class:`Detector` scores the **raw** input, one score per item, higher = more suspicious. Its
  ``threshold`` is calibrated offline to a target false-positive rate on held-out clean data;
  an item whose score exceeds the threshold is flagged as adversarial.
- :class:`Purifier` maps the input to a purified input of the same shape, dtype and range.
- :class:`Ensemble` fans each item out into ``T`` transformed copies (``expand``), the
  classifier runs on all ``N*T`` copies in one batched call, and ``aggregate`` turns the
  ``N*T`` logits back into one answer per item (possibly an abstention and a certified radius).

Every role has one required method; everything else has a default: ``fit`` does nothing,
``bpda`` is the identity (the straight-through BPDA surrogate), ``save`` writes no artifact.
Constructor keyword arguments *are* the configuration: ``config()`` returns them and
``build(kind, **config)`` rebuilds an identical defense.

Tensor conventions: ``x`` is ``[N, C, H, W]`` float32 pixels in the bundle's value range
(``[0, 1]`` by default), on the defense's device. Nothing under ``defenses/`` imports the
protocol stubs: transport lives in ``proxy/``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch

Role = Literal["detector", "purifier", "ensemble"]
Action = Literal["reject", "flag", "log", "block"]  # block: stateful stages only (defenses/pipeline.py)


class Classifier(Protocol):
    """The local backbone a defense may query (MagNet's divergence, SafetyNet's activations).

    In the proxy it is an ONNX Runtime session of the bundle's backbone; in the red team it is
    the differentiable torch twin. ``x``: ``[N, C, H, W]`` raw pixels.
    """

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # -> [N, K]
        ...

    def features(self, x: torch.Tensor) -> torch.Tensor:  # -> [N, D] late-stage activations
        ...


@dataclass
class FitData:
    """What ``fit`` gets: clean training images for fitting, clean validation images (held out
    of training) for calibration. Images ``[N, C, H, W]`` in the value range, labels ``[N]``.
    ``progress``: show tqdm bars (stderr) over the fitting loops (``robustgate fit`` sets it).
    ``device``: where the defenses that train a network train it (``robustgate fit --device``); the
    images stay on the host, each batch's random draws are made there (the same draws on any
    device) and the fitted defense is handed back on the CPU, where it is saved and calibrated."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    value_range: tuple[float, float] = (0.0, 1.0)
    progress: bool = False
    device: str = "cpu"


_REGISTRY: dict[str, type["Defense"]] = {}


def register(cls: type["Defense"]) -> type["Defense"]:
    """Class decorator: makes a defense findable by its ``kind``."""
    kind = getattr(cls, "kind", None)
    if not kind:
        raise TypeError(f"{cls.__name__} needs a class attribute `kind` to be registered")
    if kind in _REGISTRY and _REGISTRY[kind] is not cls:
        raise TypeError(f"defense kind {kind!r} is registered twice ({_REGISTRY[kind].__name__}, {cls.__name__})")
    _REGISTRY[kind] = cls
    return cls


def _load_builtin_defenses() -> None:
    # Importing the role packages runs their @register decorators.
    from robustgate.defenses import detect, ensemble, purify  # noqa: F401
    from robustgate.defenses.stateful import stage  # noqa: F401  (kind: stateful)


def registry() -> dict[str, type["Defense"]]:
    _load_builtin_defenses()
    return dict(_REGISTRY)


def build(kind: str, **config: Any) -> "Defense":
    """Constructs the registered defense ``kind`` from its configuration."""
    reg = registry()
    if kind not in reg:
        raise ValueError(f"unknown defense kind {kind!r}; known: {', '.join(sorted(reg)) or 'none'}")
    return reg[kind](**config)


#: ``build_from_bundle(runtime=SERVED)``: the runtime the proxy serves a defense with on a CPU device.
SERVED = "served"


def build_from_bundle(kind: str, name: str, params: dict[str, Any], threshold: float | None, bundle: Any | None,
                      *, where: str, runtime: str | None = None) -> "Defense":
    """One pipeline stage's defense, as the proxy serves it and the red team attacks it: when
    ``bundle`` holds a fitted defense called ``name``, its kind must be ``kind``, its params are the
    base with ``params`` merged over them, its artifacts (checksums verified by ``Bundle.load``) are
    loaded and its calibrated threshold is used unless ``threshold`` is given. ``runtime`` overrides
    the ``runtime`` parameter of the defenses that have one (the red team's ``"torch"`` twins);
    :data:`SERVED` takes the defense's :meth:`Defense.served_runtime` unless ``params`` (the stage's
    own) name a runtime (the proxy on a CPU device).
    ``ValueError`` starting with ``where`` on any problem, e.g. a ``needs_artifacts`` defense that
    the bundle has not fitted (``bundle=None``: no bundle, the caller's own untrained defenses --
    red-team unit tests)."""
    fitted = bundle.spec.defenses.get(name) if bundle is not None else None
    stage_params = params
    if bundle is not None and kind in registry():
        check_features_output(registry()[kind], bundle, where)
    if fitted is not None:
        if fitted.kind != kind:
            raise ValueError(f"{where}: kind {kind!r} but the bundle's fitted {name!r} is {fitted.kind!r}")
        params = {**fitted.params, **params}
        if threshold is None:
            threshold = fitted.threshold
    if runtime == SERVED and kind in registry():
        runtime = None if "runtime" in stage_params else registry()[kind].served_runtime(params)
    if runtime is not None and kind in registry() and "runtime" in inspect.signature(registry()[kind].__init__).parameters:
        params = {**params, "runtime": runtime}
    try:
        defense = build(kind, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build defense {kind!r}: {exc}") from exc
    if fitted is not None and fitted.files:
        defense.load_artifacts({role: bundle.path(art) for role, art in fitted.files.items()})
    elif defense.needs_artifacts and bundle is not None:
        raise ValueError(f"{where}: {kind!r} runs a fitted model, but the bundle has no fitted defense {name!r}; "
                         f"fit it first: robustgate fit --bundle BUNDLE --defense {kind} --name {name}")
    defense.to("cpu")
    if (isinstance(defense, Detector) or defense.role == "detector") and threshold is not None:
        defense.threshold = float(threshold)
    return defense


def check_features_output(cls: type["Defense"], bundle: Any, where: str) -> None:
    """``ValueError`` starting with ``where`` when defense class ``cls`` reads the backbone's
    features (``needs_features``) but ``bundle``'s backbone names no feature output."""
    if getattr(cls, "needs_features", False) and bundle.spec.backbone.features_output is None:
        raise ValueError(
            f"{where}: {cls.kind!r} reads the backbone's late-stage activations, but bundle {bundle.spec.name!r} "
            f"names no feature output (backbone.features_output is unset); import the model with "
            f"--features-output NAME (an output of its ONNX graph, e.g. the penultimate layer) or choose "
            f"a detector that needs none (magnet)")


class Defense(ABC):
    """Base of every defense. Subclasses set ``kind`` and ``role`` and validate their keyword
    arguments in ``__init__`` (raise ``ValueError`` naming the bad argument)."""

    kind: ClassVar[str]
    role: ClassVar[Role]
    #: The stage draws random numbers (the red team must use EOT over it).
    randomized: ClassVar[bool] = False
    #: The stage has useful gradients (if False, the red team uses ``bpda``).
    differentiable: ClassVar[bool] = True
    #: The stage runs a fitted model (autoencoder, SVM, diffusion model): serving it without the
    #: artifacts ``robustgate fit`` writes into the bundle is refused at start.
    needs_artifacts: ClassVar[bool] = False

    @classmethod
    def served_runtime(cls, params: dict[str, Any]) -> str | None:
        """The ``runtime`` the proxy serves this defense with on a CPU device when the stage's own
        params name none (``params``: the fitted params merged with the stage's), because it was
        measured the faster there; None (default): the runtime the bundle recorded."""
        return None

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments, so that ``build(kind, **config())`` round-trips.

        The default reads attributes named like the ``__init__`` parameters."""
        params = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in params if name != "self" and hasattr(self, name)}

    def fit(self, data: FitData, classifier: Classifier | None = None) -> None:
        """Offline fitting (autoencoders, SVMs, diffusion models). Default: nothing to fit."""

    def save(self, directory: Path) -> dict[str, str]:
        """Writes the fitted artifacts into ``directory``; returns ``{role: relative file name}``.
        Default: nothing to write."""
        return {}

    def load_artifacts(self, files: dict[str, Path]) -> None:
        """Loads what ``save`` wrote (``{role: path}``, checksums already verified)."""
        if files:
            raise ValueError(f"{self.kind}: got artifacts {sorted(files)} but this defense has none")

    def to(self, device: torch.device | str) -> "Defense":
        """Moves held tensors/modules to ``device``. Default: nothing held."""
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Purifier(Defense):
    role: ClassVar[Role] = "purifier"

    @abstractmethod
    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``, same dtype, values kept in the value range."""

    def bpda(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable surrogate of ``purify`` for BPDA; default: identity (straight-through)."""
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.purify(x, generator)


class Detector(Defense):
    role: ClassVar[Role] = "detector"
    #: The score reads ``classifier.features`` (late-stage activations): the bundle's backbone must
    #: name its feature output (``backbone.features_output``), else the stage is refused at assembly.
    needs_features: ClassVar[bool] = False

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    @abstractmethod
    def score(self, x: torch.Tensor, classifier: Classifier | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N]`` float scores, higher = more likely adversarial."""

    def onnx_score_model(self):
        """The score as one ONNX graph, ``[N, C, H, W]`` raw input -> ``[N]``, that a backend may
        fuse into the backbone's graph (proxy/backends/fuse.py): one session call for both, without
        this detector's own session and tensor glue. ``None`` (the default): no such graph, the
        pipeline calls :meth:`score`. Its scores must equal :meth:`score`'s (a parity test)."""
        return None

    def is_adversarial(self, scores: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: score above the calibrated threshold."""
        if self.threshold is None:
            raise ValueError(f"{self.kind}: no threshold; calibrate it (robustgate fit) before use")
        return scores > self.threshold


@dataclass
class EnsembleResult:
    """One answer per item: ``probs`` ``[N, K]``; ``abstain`` ``[N]`` bool (abstention counts as a
    rejection); ``radius`` ``[N]`` certified L2 radius where the ensemble certifies, else None."""

    probs: torch.Tensor
    abstain: torch.Tensor
    radius: torch.Tensor | None = None


class Ensemble(Defense):
    role: ClassVar[Role] = "ensemble"

    @property
    @abstractmethod
    def copies(self) -> int:
        """``T``, the number of copies ``expand`` makes of each item."""

    @abstractmethod
    def expand(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N*T, C, H, W]``, item-major (rows ``i*T .. i*T+T-1`` are item ``i``)."""

    @abstractmethod
    def aggregate(self, logits: torch.Tensor) -> EnsembleResult:
        """``[N*T, K]`` logits (item-major) -> one :class:`EnsembleResult` for the ``N`` items."""


def check_images(x: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0), who: str = "input") -> None:
    """Raises ``ValueError`` unless ``x`` is a finite float ``[N, C, H, W]`` tensor in ``value_range``.

    Wrong input (normalized where raw pixels are expected) fails loudly instead of being fixed."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who}: expected [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{who}: expected a floating-point tensor, got {x.dtype}")
    if not x.numel():
        return
    # one pass for all three checks: min and max propagate NaN, and an Inf is the min or the max
    got_lo, got_hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(got_lo) and math.isfinite(got_hi)):
        raise ValueError(f"{who}: contains NaN or Inf")
    lo, hi = value_range
    if got_lo < lo or got_hi > hi:
        raise ValueError(
            f"{who}: values in [{got_lo:.4g}, {got_hi:.4g}] fall outside the "
            f"declared range [{lo}, {hi}] (normalized input where raw pixels are expected?)"
        )
