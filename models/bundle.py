"""The bundle: one directory that fully describes what the proxy serves.

Written by ``robustgate train`` / ``robustgate import`` / ``robustgate fit``, read by ``robustgate serve`` and
``robustgate eval``. ``bundle.yaml`` at its root holds (DESIGN.md, "The bundle"):

- ``schema_version`` -- an unknown version refuses to load;
- ``input`` -- per-item shape (C, H, W), layout, datatype, value range and the normalization the
  model applies *inside* its graph (inputs are always raw pixels in ``value_range``);
- ``classes`` -- class names, index = logit position;
- ``backbone`` -- the ONNX file the proxy runs (or, for a model imported from a running model
  server, where that server is), how its torch twin is built (the red team differentiates that:
  architecture + safetensors weights, the ONNX file converted, or none), training recipe and
  measured metrics;
- ``defenses`` -- each fitted defense by name: kind, artifact files, parameters, threshold and
  calibration record;
- ``provenance`` -- command line, seed, code revision, creation time.

Every artifact carries a sha256 checked at load; artifacts are ONNX, safetensors or JSON,
never pickle. Loading fails with :class:`BundleError` and a message that names the file or key.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.yaml"
SAFE_SUFFIXES = (".onnx", ".safetensors", ".json", ".yaml", ".yml", ".npz")


class BundleError(ValueError):
    """A bundle that cannot be loaded: missing file, checksum mismatch, bad schema."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Artifact(_Strict):
    """A file inside the bundle, relative to its root, with its sha256."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _relative_and_safe(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"artifact path {v!r} must be relative and stay inside the bundle")
        if not v.endswith(SAFE_SUFFIXES):
            raise ValueError(f"artifact {v!r}: only {', '.join(SAFE_SUFFIXES)} files are allowed (no pickles)")
        return v


class InputSpec(_Strict):
    """What one item of a request must look like. The batch axis is not part of ``shape``."""

    name: str = "input"
    shape: tuple[int, int, int]  # (C, H, W), whatever the layout
    # how clients send an item and the model takes it natively: NHWC = [batch, H, W, C] on the wire
    # (a channels-last model: robustgate import); the pipeline, the twin and the defenses see NCHW
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    datatype: Literal["FP32"] = "FP32"  # what the backbone consumes; UINT8 requests span value_range (models/levels.py)
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = ()  # normalization applied inside the model graph (documentation)
    std: tuple[float, ...] = ()
    # clients send (pixels - mean) / std per channel, not pixels (robustgate import --mean/--std): the
    # proxy turns requests back into pixels for the defenses and backbone.onnx normalizes inside
    # (models/client_values.py). None (the usual case, and every bundle written before the key existed): pixels
    normalized: bool | None = None
    # BGR: the clients send, and the model takes, 3 channels in blue, green, red order (OpenCV's
    # imread, Caffe models; robustgate import --channel-order BGR): the proxy reverses them for the
    # defenses (RGB, as JPEG's colour transform and the data sets are) and backbone.onnx reverses them
    # back inside (models/client_values.py); mean and std are in the clients' order. None: RGB (every
    # bundle written before the key existed)
    channel_order: Literal["RGB", "BGR"] | None = None

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"input.shape {self.shape} must be positive (C, H, W)")
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError(f"input.value_range {self.value_range} must be increasing")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v and len(v) != self.shape[0]:
                raise ValueError(f"input.{key} has {len(v)} values for {self.shape[0]} channels")
        if self.channel_order == "BGR" and self.shape[0] != 3:
            raise ValueError(f"input.channel_order BGR needs 3 channels, input.shape is {self.shape}")
        if self.normalized:
            if not self.mean or not self.std:
                raise ValueError("input.normalized needs input.mean and input.std (one value per channel)")
            if any(not s > 0 for s in self.std):
                raise ValueError(f"input.std {self.std} must be positive")
        return self


class UpstreamSource(_Strict):
    """Where a backbone without an ONNX file is served: a V2 model server read at import time."""

    url: str  # host:port of its gRPC endpoint, as given to ``robustgate import --upstream``
    model_name: str
    model_version: str = ""
    platform: str = ""  # as the server's ModelMetadata named it (e.g. onnxruntime_onnx, triton)


TWIN_KINDS = ("arch", "onnx", "none")


class BackboneSpec(_Strict):
    """The classifier. ``onnx`` is the graph the in-process backend runs; a bundle imported from a
    running model server (``robustgate import --upstream``) has none and names ``upstream`` instead.

    The torch twin (what ``fit`` and the red team differentiate), by ``twin``:

    - ``arch``: ``build_arch(arch, **arch_kwargs)`` with the safetensors ``weights`` (``train``);
    - ``onnx``: the ONNX file itself, converted to torch by onnx2torch when loaded
      (``robustgate import``; ``twin_parity`` records the check against ONNX Runtime);
    - ``none``: no twin (``twin_note`` says why); only gradient-free attacks apply.

    ``twin`` absent (bundles written before it existed): ``arch`` when ``weights`` is set, else
    ``none`` -- see :meth:`twin_kind`.
    """

    onnx: Artifact | None = None
    upstream: UpstreamSource | None = None
    weights: Artifact | None = None  # safetensors state dict of the torch twin (twin: arch)
    arch: str
    arch_kwargs: dict[str, Any] = {}
    twin: Literal["arch", "onnx", "none"] | None = None
    twin_note: str | None = None  # why there is no twin, or how the onnx twin was converted
    twin_parity: dict[str, Any] | None = None  # twin vs ONNX Runtime at import: inputs, max |diff|, tolerance
    logits_output: str = "logits"
    # what that output holds: logits, or probabilities (a model that ends in a softmax, as Keras
    # classifiers usually do; robustgate import recognises it): robustgate then runs on their
    # logarithms and answers probabilities (models/output_kind.py). None (a trained bundle, or one
    # written before the key existed): logits
    output_kind: Literal["logits", "probabilities"] | None = None
    features_output: str | None = None  # late-stage ReLU activations (SafetyNet), if exported
    recipe: dict[str, Any] = {}
    metrics: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "BackboneSpec":
        if self.onnx is None and self.upstream is None:
            raise ValueError("backbone.onnx: required (or backbone.upstream, for a backbone served by a model server)")
        kind = self.twin_kind()
        if kind == "arch" and self.weights is None:
            raise ValueError("backbone.twin is 'arch' but backbone.weights is missing")
        if kind == "onnx" and self.onnx is None:
            raise ValueError("backbone.twin is 'onnx' but the backbone has no onnx file to convert")
        return self

    def twin_kind(self) -> str:
        """``arch`` | ``onnx`` | ``none`` (the stored ``twin``, or what an older bundle implies)."""
        if self.twin is not None:
            return self.twin
        return "arch" if self.weights is not None else "none"


class DefenseSpec(_Strict):
    kind: str
    files: dict[str, Artifact] = {}
    params: dict[str, Any] = {}
    threshold: float | None = None
    calibration: dict[str, Any] | None = None  # target FPR, measured val/test FPR, score quantiles


class BundleSpec(_Strict):
    schema_version: int
    name: str
    input: InputSpec
    classes: list[str] = Field(min_length=2)
    backbone: BackboneSpec
    defenses: dict[str, DefenseSpec] = {}
    provenance: dict[str, Any] = {}

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unknown bundle schema_version {v}; this robustgate reads version {SCHEMA_VERSION}")
        return v


class Bundle:
    """A loaded, verified bundle: its spec plus the directory it lives in."""

    def __init__(self, root: Path, spec: BundleSpec):
        self.root = Path(root)
        self.spec = spec

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        """Reads ``root/bundle.yaml``; with ``verify`` (default) checks every artifact's sha256."""
        root = Path(root)
        manifest = root / BUNDLE_FILE
        if not manifest.is_file():
            raise BundleError(f"{root}: no {BUNDLE_FILE} (is this a bundle directory?)")
        try:
            raw = yaml.safe_load(manifest.read_text())
        except yaml.YAMLError as exc:
            raise BundleError(f"{manifest}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise BundleError(f"{manifest}: expected a mapping at the top level")
        try:
            spec = BundleSpec.model_validate(raw)
        except ValidationError as exc:
            raise BundleError(f"{manifest}: {_describe(exc)}") from exc
        bundle = cls(root, spec)
        if verify:
            bundle.verify()
        return bundle

    def artifacts(self) -> dict[str, Artifact]:
        """Every artifact by a dotted key naming where it is declared."""
        out = {}
        if self.spec.backbone.onnx is not None:
            out["backbone.onnx"] = self.spec.backbone.onnx
        if self.spec.backbone.weights is not None:
            out["backbone.weights"] = self.spec.backbone.weights
        for name, d in self.spec.defenses.items():
            for role, art in d.files.items():
                out[f"defenses.{name}.files.{role}"] = art
        return out

    def verify(self) -> None:
        for key, art in self.artifacts().items():
            path = self.root / art.path
            if not path.is_file():
                raise BundleError(f"{self.root}: {key} names {art.path}, which does not exist")
            actual = sha256_file(path)
            if actual != art.sha256:
                raise BundleError(
                    f"{self.root}: checksum mismatch for {key} ({art.path}): bundle.yaml says "
                    f"{art.sha256[:12]}…, the file hashes to {actual[:12]}… — refusing to load"
                )

    def path(self, art: Artifact) -> Path:
        return self.root / art.path

    @property
    def backbone_id(self) -> str:
        """What identifies the served backbone in reports and caches: its ONNX file's sha256, or
        ``upstream:URL/MODEL`` for a bundle imported from a model server (no ONNX file)."""
        bb = self.spec.backbone
        if bb.onnx is not None:
            return bb.onnx.sha256
        return f"upstream:{bb.upstream.url}/{bb.upstream.model_name}"

    def onnx_path(self) -> Path:
        """The backbone's ONNX file; BundleError when the bundle has none (imported from a model
        server: it can only be served with the upstream backend)."""
        bb = self.spec.backbone
        if bb.onnx is None:
            up = bb.upstream
            where = f" (imported from model {up.model_name!r} at {up.url})" if up is not None else ""
            raise BundleError(
                f"{self.root}: the backbone has no ONNX file{where}; serve it with backend.kind: upstream, "
                f"or import the ONNX file with `robustgate import --onnx`"
            )
        return self.path(bb.onnx)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input(self) -> InputSpec:
        return self.spec.input

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    def defense(self, name: str) -> DefenseSpec:
        try:
            return self.spec.defenses[name]
        except KeyError:
            fitted = ", ".join(sorted(self.spec.defenses)) or "none"
            raise BundleError(
                f"{self.root}: defense {name!r} is not fitted in this bundle (fitted: {fitted}); "
                f"run `robustgate fit --bundle {self.root} --defense ...`"
            ) from None

    # ---- writing -------------------------------------------------------------------------
    def with_defense(self, name: str, spec: DefenseSpec) -> "Bundle":
        defenses = dict(self.spec.defenses)
        defenses[name] = spec
        return Bundle(self.root, self.spec.model_copy(update={"defenses": defenses}))

    def save(self) -> Path:
        """Writes ``bundle.yaml`` (artifact files must already be in place and hashed) and gives
        every artifact the permissions of a file created under the process umask: safetensors
        writes its files 0600, which a non-root server (the container image) could not read."""
        self.root.mkdir(parents=True, exist_ok=True)
        mode = 0o666 & ~_umask()
        for art in self.artifacts().values():
            path = self.root / art.path
            if path.is_file():
                path.chmod(mode)
        data = self.spec.model_dump(mode="json", exclude_none=True)
        path = self.root / BUNDLE_FILE
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        tmp.replace(path)
        return path


def _umask() -> int:
    current = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(current)
    return current


def artifact(root: Path, relpath: str) -> Artifact:
    """Hashes ``root/relpath`` (already written) into an :class:`Artifact`."""
    return Artifact(path=relpath, sha256=sha256_file(Path(root) / relpath))


def provenance(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Command line, seed, code revision and time, for ``bundle.yaml``'s provenance block."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    out: dict[str, Any] = {
        "command": " ".join(["robustgate", *sys.argv[1:]]) if sys.argv else "",
        "code_revision": rev,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if seed is not None:
        out["seed"] = seed
    out.update(extra)
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
