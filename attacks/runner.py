"""The evaluation matrix: pipeline configurations x attacks x epsilons, scored on the served path.

Every configuration is built by the one assembly the proxy uses (:mod:`robustgate.defenses.assemble`):
its stages are validated by the proxy's own pydantic ``PipelineConfig``, the served pipeline is the
proxy's :class:`~robustgate.defenses.assemble.PipelineRunner` on the proxy's ONNX Runtime backend
(proxy/backends/onnx.py), and the attacked twin is ``build_stages(..., twin=True)`` on the torch
twin of the backbone. Attacks are generated on the twin (adaptive) or the undefended backbone
(non-adaptive) and always scored on the served runner. After every attack the perturbation is
asserted to stay within eps and the [0, 1] box. Each finished cell is written as JSON under
``out/cells/`` and its adversarial examples batch by batch under ``out/adv/`` (safetensors), so an
interrupted run resumes where it stopped; a backbone attack's examples are generated once and
shared by every configuration.

A bundle without a torch twin (``models.twin.has_twin``) gets only the attacks that need no
gradient of it: Square through the served pipeline, and, with ``surrogate``, the backbone attacks
crafted on the surrogate bundle's twin (transfer, recorded in the threat model). Every other
attack is skipped with its reason in every report (``skipped_attacks``).

Metrics (each cell carries its :class:`~robustgate.attacks.threat.ThreatModel`):

- clean accuracy: accepted (not rejected) and correct, over all n items;
- false-rejection rate: clean items rejected;
- robust accuracy: attacked items that are rejected, or accepted and correctly classified;
- attack success rate: among items accepted and correct when clean, the share whose attacked
  version is accepted and misclassified;
- per detector: TPR on the attacked items at the calibrated threshold, the clean FPR at that
  threshold, ROC AUC (clean vs attacked scores);
- certified accuracy at L2 radii when the ensemble certifies (correct, not abstained,
  radius >= r);
- wall time per cell and served latency per item.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from tqdm import tqdm

from robustgate.attacks.differentiable import BackboneOnly, PipelineTwin
from robustgate.attacks.square import LocalOracle, QueryOracle
from robustgate.attacks.suite import ATTACKS, AttackContext, threat_model
from robustgate.attacks.threat import check_perturbation
from robustgate.defenses.assemble import PipelineRunner, build_runner, build_stages, resolve_device
from robustgate.defenses.config import PipelineConfig, describe_error
from robustgate.defenses.base import Detector
from robustgate.defenses.pipeline import FLAGGED, REJECTED, Stage, split_stages

CELL_SCHEMA = 1
TWIN_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class NamedPipeline:
    """One configuration of the matrix: a name (a report column) and the proxy's pipeline config."""

    name: str
    pipeline: PipelineConfig

    @property
    def stages(self) -> list[dict[str, Any]]:
        """The stages as written (defaults left out): what reports show and fingerprints hash."""
        return [s.model_dump(mode="json", exclude_defaults=True) for s in self.pipeline.stages]

    @property
    def failure_policy(self) -> str:
        return self.pipeline.failure_policy


def _validated(path: Path, key: str, body: Any) -> PipelineConfig:
    """``body`` as the proxy's PipelineConfig (a stage without a name is named after its kind);
    ValueError naming the bad key, e.g. ``configs.jpeg.stages.0.kind: Field required``."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ValueError(f"{path}: {key or 'top level'}: expected a mapping with 'stages'")
    if isinstance(body.get("stages"), list):
        body = {**body, "stages": [{"name": st["kind"], **st} if isinstance(st, dict) and "kind" in st
                                   and "name" not in st else st for st in body["stages"]]}
    try:
        return PipelineConfig.model_validate(body)
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe_error(exc, key)}") from None


def load_pipelines(path: str | Path | None, each_alone: bool = False) -> list[NamedPipeline]:
    """Reads the configurations to evaluate, each validated by the proxy's ``PipelineConfig``.
    Accepted YAML shapes:

    - a proxy config: ``pipeline: {stages: [...], failure_policy, ...}`` (named after the file);
    - ``stages: [...]`` and the other pipeline keys at the top level (named after the file);
    - ``configs: {NAME: {stages: [...], failure_policy, ...}}``.

    The undefended backbone (``none``, no stages) always comes first; ``each_alone`` adds one
    configuration per stage of every listed pipeline (``only-<stage name>``)."""
    configs = [NamedPipeline("none", PipelineConfig())]
    if path is None:
        return configs
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "configs" in raw:
        if not isinstance(raw["configs"], dict):
            raise ValueError(f"{path}: configs: must map names to {{stages, failure_policy}}")
        listed = [NamedPipeline(str(name), _validated(path, f"configs.{name}", body))
                  for name, body in raw["configs"].items()]
    elif "pipeline" in raw:
        listed = [NamedPipeline(path.stem, _validated(path, "pipeline", raw["pipeline"]))]
    elif "stages" in raw:
        listed = [NamedPipeline(path.stem, _validated(path, "", raw))]
    else:
        raise ValueError(f"{path}: expected 'configs', 'pipeline' or 'stages' at the top level")
    if each_alone:
        seen = set()
        for cfg in listed:
            for st in cfg.pipeline.stages:
                if st.name not in seen and len(cfg.pipeline.stages) > 1:
                    seen.add(st.name)
                    configs.append(NamedPipeline(f"only-{st.name}", cfg.pipeline.model_copy(update={"stages": [st]})))
    configs.extend(c for c in listed if c.name != "none")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: configuration names must be unique: {names}")
    return configs


@dataclass
class EvalSettings:
    attacks: list[str]
    eps: list[float]  # l-inf radii (fgsm, pgd, autoattack, bpda, eot, joint, square)
    eps_l2: list[float] = field(default_factory=lambda: [1.0, 2.0])  # l2 radii (cw, deepfool)
    n: int = 100
    offset: int = 0
    steps: int = 20
    restarts: int = 1
    eot: int = 8
    queries: int = 500
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    batch_size: int = 250
    seed: int = 0
    url: str | None = None  # live proxy for the black-box attack (else the local served pipeline)
    model_name: str | None = None
    url_config: str | None = None  # the configuration the live proxy at ``url`` serves
    # precision of the differentiable purifiers inside the pipeline twin (PipelineTwin.precision);
    # written into the threat model of every attack on the pipeline twin
    twin_precision: str = "float32"
    dataset: str | None = None  # models.data dataset name; None: the bundle recipe's, else fashion-mnist
    data_dir: str | None = None
    device: str = "cpu"  # where attacks are generated (the twin and the backbone): cpu | cuda | auto
    surrogate: str | None = None  # a bundle whose twin crafts transfer attacks when this one has none
    channel: Any = None  # attacks.endpoint.Channel to ``url`` (TLS, a bearer token); reports say only which

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.twin_precision not in TWIN_PRECISIONS:
            raise ValueError(f"twin_precision must be one of {', '.join(TWIN_PRECISIONS)}, got {self.twin_precision!r}")


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_key(config: str, attack: str, eps: float) -> str:
    return f"{config}__{attack}__eps{eps:g}"


def _run_served(model: PipelineRunner, x: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Served answers for ``x``: per-item prediction, verdict, detector scores, radius, seconds."""
    preds, verdicts, radii, scores = [], [], [], {}
    seconds = 0.0
    for i in range(0, len(x), batch_size):
        t0 = time.perf_counter()
        out = model(x[i:i + batch_size])
        seconds += time.perf_counter() - t0
        preds.append(out.logits.argmax(1))
        verdicts.append(out.verdict)
        if out.radius is not None:
            radii.append(out.radius)
        for name, s in out.scores.items():
            scores.setdefault(name, []).append(s)
    return {
        "pred": torch.cat(preds).tolist(),
        "verdict": torch.cat(verdicts).tolist(),
        "radius": torch.cat(radii).tolist() if radii else None,
        "scores": {k: torch.cat(v).tolist() for k, v in scores.items()},
        "seconds": seconds,
    }


def _detector_metrics(clean: dict, adv: dict, thresholds: dict[str, float]) -> dict[str, Any]:
    out = {}
    for name, clean_s in clean["scores"].items():
        adv_s = adv["scores"].get(name)
        if adv_s is None:
            continue
        c, a = np.asarray(clean_s, dtype=np.float64), np.asarray(adv_s, dtype=np.float64)
        labels = np.r_[np.zeros(len(c)), np.ones(len(a))]
        scores = np.r_[c, a]
        thr = thresholds.get(name)
        entry: dict[str, Any] = {"threshold": thr, "auc": float(roc_auc_score(labels, scores))}
        if thr is not None:
            entry["tpr_at_threshold"] = float((a > thr).mean())
            entry["fpr_at_threshold"] = float((c > thr).mean())
        fpr, tpr, _ = roc_curve(labels, scores)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
        entry["roc"] = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}
        out[name] = entry
    return out


def _randomized(stages: list[Stage]) -> bool:
    """Some stage draws random numbers: attacks must use EOT (as PipelineTwin.randomized)."""
    return any(s.defense.randomized for s in stages if not isinstance(s.defense, Detector))


class Evaluation:
    """One ``robustgate eval`` run. ``backbone``: the torch twin (default: loaded from the bundle
    by ``models.twin.load_backbone`` when ``models.twin.has_twin``, else from ``settings.surrogate``
    for transfer attacks, else none: gradient attacks are skipped with their reason)."""

    def __init__(self, bundle, configs: list[NamedPipeline], settings: EvalSettings, out: str | Path,
                 backbone: nn.Module | None = None, progress: bool = True, surface_points: int = 2):
        from robustgate.models.data import bundle_splits
        from robustgate.proxy.backends.onnx import OnnxBackend, OnnxClassifier

        self.bundle = bundle
        self.configs = configs
        self.settings = settings
        self.out = Path(out)
        self.progress = progress
        self.surface_points = surface_points
        self.device = resolve_device(settings.device)
        self.transfer_from, self.no_twin = self._attack_model(backbone)
        self.backbone = None if self.attacked is None else BackboneOnly(self.attacked.to(self.device))
        # the proxy's own backend and local classifier (proxy/serve.py make_backend, local_classifier)
        self.backend = OnnxBackend(bundle, device="cpu", intra_op_threads=1, inter_op_threads=1)
        classifier = OnnxClassifier(self.backend)
        self.num_classes = len(bundle.classes)
        # every configuration is built here, before any cell runs: a bad one fails at once, not hours in
        self.built: dict[str, tuple[PipelineRunner, PipelineTwin | None]] = {}
        for cfg in configs:
            served = build_runner(cfg.pipeline, bundle, self.backend, classifier)
            twin = None
            if self.transfer_from is None and self.backbone is not None:
                twin = PipelineTwin(self.backbone.backbone, build_stages(cfg.pipeline, bundle, twin=True, device=self.device),
                                    bpda=True, precision=TWIN_PRECISIONS[settings.twin_precision])
            self.built[cfg.name] = (served, twin)
        splits = bundle_splits(bundle, settings.dataset, settings.data_dir)
        self.data_name = splits.name
        if settings.offset + settings.n > splits.size("test"):
            raise ValueError(f"asked for {settings.n} test images from offset {settings.offset}; "
                             f"{splits.name} has only {splits.size('test')}")
        self.x, self.y = splits.take("test", settings.n, settings.offset)  # conformed to the bundle's input
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        (self.out / "adv").mkdir(parents=True, exist_ok=True)

    def _attack_model(self, backbone: nn.Module | None) -> tuple[dict | None, str | None]:
        """Sets ``self.attacked``, the torch module gradient attacks differentiate; returns (the
        surrogate bundle when the attacks are transferred from it, else None; why this bundle has
        no twin, else None)."""
        from robustgate.models.bundle import Bundle
        from robustgate.models.twin import has_twin, load_backbone

        self.attacked = backbone
        if backbone is not None:
            return None, None
        if has_twin(self.bundle):
            self.attacked = load_backbone(self.bundle, device=self.device)
            return None, None
        reason = f"bundle {self.bundle.name!r} has no torch twin"
        if self.settings.surrogate is None:
            return None, reason
        surrogate = Bundle.load(self.settings.surrogate)
        if not has_twin(surrogate):
            raise ValueError(f"surrogate {surrogate.root}: that bundle has no torch twin either")
        if (tuple(surrogate.input.shape) != tuple(self.bundle.input.shape)
                or len(surrogate.classes) != len(self.bundle.classes)):
            raise ValueError(f"surrogate {surrogate.root}: input {list(surrogate.input.shape)} with "
                             f"{len(surrogate.classes)} classes does not match the evaluated bundle's "
                             f"{list(self.bundle.input.shape)} with {len(self.bundle.classes)} classes")
        self.attacked = load_backbone(surrogate, device=self.device)
        return {"path": str(surrogate.root), "name": surrogate.name,
                "backbone_sha256": surrogate.backbone_id}, reason

    def attack_skip(self, attack: str) -> str | None:
        """Why ``attack`` cannot run on this bundle at all (None: it can): only when it has no twin."""
        a = ATTACKS[attack]
        if self.no_twin is None or a.target == "endpoint":
            return None
        if self.transfer_from is None:
            return (f"{self.no_twin}: {attack} needs gradients of the model; pass --surrogate BUNDLE for transfer "
                    f"attacks crafted on another bundle's twin")
        if a.target == "pipeline":
            return (f"{self.no_twin}: {attack} differentiates this bundle's defended pipeline; the surrogate "
                    f"{self.transfer_from['name']!r} transfers the backbone attacks only")
        return None

    def skipped_attacks(self) -> dict[str, str]:
        """``{attack: reason}`` for the requested attacks that do not run on this bundle."""
        return {a: r for a in self.settings.attacks if (r := self.attack_skip(a)) is not None}

    # ---- cache ------------------------------------------------------------------------------
    def _cached(self, key: str, fingerprint: str) -> dict | None:
        """The stored cell ``key`` if it was computed from exactly the same inputs."""
        path = self.out / "cells" / f"{key}.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if data.get("schema") == CELL_SCHEMA and data.get("fingerprint") == fingerprint else None

    def _store(self, key: str, fingerprint: str, data: dict) -> dict:
        data = {"schema": CELL_SCHEMA, "fingerprint": fingerprint, "n": self.settings.n,
                "offset": self.settings.offset, **data}
        path = self.out / "cells" / f"{key}.json"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: --parallel workers
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
        return data

    # ---- pieces -----------------------------------------------------------------------------
    def _oracle(self, served: PipelineRunner, config: NamedPipeline) -> QueryOracle:
        if self.settings.url is None or config.name != self.settings.url_config:
            return LocalOracle(served)
        from robustgate.attacks.endpoint import GrpcOracle

        from robustgate.models.client_values import ClientValues

        return GrpcOracle(self.settings.url, self.settings.model_name or self.bundle.name,
                          client_values=ClientValues.of(self.bundle.input), channel=self.settings.channel)

    def _config_fingerprint(self, config: NamedPipeline) -> str:
        """What a configuration's cells depend on: the bundle (manifest, so every artifact's
        sha256), the pipeline config, the data and the seed."""
        manifest = (self.bundle.root / "bundle.yaml").read_text()
        return _fingerprint({"bundle": manifest, "pipeline": config.pipeline.model_dump(mode="json"),
                             "data": self.data_name, "n": self.settings.n, "offset": self.settings.offset,
                             "seed": self.settings.seed})

    def _backbone_accuracy(self, x: torch.Tensor) -> float:
        """The undefended served backbone (the proxy's ONNX Runtime backend) on ``x``."""
        logits = torch.from_numpy(self.backend.infer(x.detach().cpu().numpy()))
        return float((logits.argmax(1) == self.y).float().mean())

    def _clean(self, config: NamedPipeline, served: PipelineRunner) -> dict:
        key = f"{config.name}__clean"
        fp = self._config_fingerprint(config)
        hit = self._cached(key, fp)
        if hit is not None:
            return hit
        ans = _run_served(served, self.x, self.settings.batch_size)
        y = self.y.tolist()
        verdict, pred = np.asarray(ans["verdict"]), np.asarray(ans["pred"])
        correct = pred == np.asarray(y)
        rejected = verdict == REJECTED
        backbone_acc = self._backbone_accuracy(self.x)
        metrics = {
            "clean_accuracy": float((correct & ~rejected).mean()),
            "false_rejection_rate": float(rejected.mean()),
            "flag_rate": float((verdict == FLAGGED).mean()),
            "backbone_clean_accuracy": backbone_acc,
            "latency_ms_per_item": 1000.0 * ans["seconds"] / len(y),
        }
        if ans["radius"] is not None:
            radius = np.nan_to_num(np.asarray(ans["radius"], dtype=np.float64), nan=-1.0)
            metrics["certified_accuracy"] = {
                f"{r:g}": float((correct & ~rejected & (radius >= r)).mean()) for r in self.settings.radii
            }
        return self._store(key, fp, {"config": config.name, "metrics": metrics, "answers": ans})

    def _adversarial(self, attack: str, tm, ctx: AttackContext, cache_key: str) -> tuple[torch.Tensor, float]:
        """Runs ``attack`` over the test set batch by batch: each batch is its own cached part,
        seeded by its first index, so that parallel workers can generate the parts of one cell
        side by side (attacks/parallel.py) and an interrupted cell resumes at its next batch.
        -> (the adversarial examples, the seconds their generation took, summed over the parts)."""
        parts = [self._adversarial_part(attack, tm, ctx, cache_key, i) for i in self.part_starts()]
        return torch.cat([p for p, _ in parts]), sum(sec for _, sec in parts)

    def part_starts(self) -> range:
        """The first test-set index of every attack batch."""
        return range(0, len(self.x), self.settings.batch_size)

    def _adversarial_part(self, attack: str, tm, ctx: AttackContext, cache_key: str, start: int) -> tuple[torch.Tensor, float]:
        """One batch of an attack, from the cache or generated (seed + ``start``), asserted and stored."""
        xb, yb = self.x[start:start + self.settings.batch_size], self.y[start:start + self.settings.batch_size]
        path = self.out / "adv" / cache_key / f"{start}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
            check_perturbation(stored["x_adv"], xb, tm.norm, tm.eps, who=f"{attack} (cached)")
            return stored["x_adv"], float(stored["seconds"].item())
        t0 = time.perf_counter()
        torch.manual_seed(self.settings.seed + start)
        # gradient attacks run where the twin is; a query attack where its oracle answers (the host)
        dev = "cpu" if ATTACKS[attack].target == "endpoint" else self.device
        adv = ATTACKS[attack].run(ctx, tm, xb.to(dev), yb.to(dev)).detach().float().cpu()
        check_perturbation(adv, xb, tm.norm, tm.eps, who=attack)
        seconds = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # written whole, then renamed: a parallel
        save_file({"x_adv": adv.contiguous(), "seconds": torch.tensor([seconds], dtype=torch.float64)}, str(tmp))  # reader never sees half a file
        tmp.replace(path)
        return adv, seconds

    def _attack_setup(self, config: NamedPipeline, served: PipelineRunner, twin: PipelineTwin | None, attack: str,
                      eps: float):
        """-> (threat model, its recorded parameters, attack context, the key of its cached
        adversarial examples, the live oracle's URL or None)."""
        s = self.settings
        a = ATTACKS[attack]
        eot = s.eot if _randomized(served.stages) else 1
        tm = threat_model(attack, eps, s.n, s.steps, s.restarts, eot, s.queries)
        threat = tm.as_dict()
        if a.params and self.backbone is not None:
            threat |= a.params(tm, self.backbone.backbone)  # + step size etc.
        if a.target == "pipeline":
            threat["twin_precision"] = s.twin_precision
        if a.target == "backbone" and self.transfer_from is not None:  # crafted on another bundle's twin
            threat["transfer_from"] = self.transfer_from["name"]
        ctx = AttackContext(self.backbone, twin, self._oracle(served, config), self.num_classes, s.seed)
        oracle_url = s.url if attack == "square" and config.name == s.url_config else None
        batches = {"offset": s.offset, "seed": s.seed, "batch_size": s.batch_size, "seeding": "per batch"}
        if a.target == "backbone":  # does not depend on the configuration: generated once, reused across configs
            attacked = (self.transfer_from or {}).get("backbone_sha256") or self.bundle.backbone_id
            cache = f"{attack}__eps{eps:g}__" + _fingerprint({
                "backbone": attacked, "data": self.data_name, "threat_model": threat, **batches})
        else:
            cache = f"{config.name}__{attack}__eps{eps:g}__" + _fingerprint({
                "config": self._config_fingerprint(config), "threat_model": threat, "url": oracle_url, **batches})
        return tm, threat, ctx, cache, oracle_url

    def skip_reason(self, config_name: str, attack: str) -> str | None:
        """Why ``attack`` does not run on this configuration (None: it runs): it cannot run on this
        bundle (:meth:`attack_skip`), or it would only repeat another cell."""
        reason = self.attack_skip(attack)
        if reason is not None:
            return reason
        stages = self.built[config_name][0].stages
        if attack == "eot" and not _randomized(stages):
            return "no randomized stage: EOT = bpda"
        if attack == "joint" and not split_stages(stages)[0]:
            return "no detector stage: joint = bpda"
        return None

    def attack_part(self, config: NamedPipeline, served: PipelineRunner, twin: PipelineTwin | None, attack: str,
                    eps: float, start: int) -> None:
        """Generates (or finds) the cached batch from ``start`` of one cell's adversarial
        examples (attacks/parallel.py)."""
        tm, _, ctx, cache, _ = self._attack_setup(config, served, twin, attack, eps)
        self._adversarial_part(attack, tm, ctx, cache, start)

    def _cell(self, config: NamedPipeline, served: PipelineRunner, twin: PipelineTwin | None, clean: dict,
              attack: str, eps: float) -> dict:
        key = _cell_key(config.name, attack, eps)
        s = self.settings
        a = ATTACKS[attack]
        tm, threat, ctx, cache, oracle_url = self._attack_setup(config, served, twin, attack, eps)
        fp = _fingerprint({"config": self._config_fingerprint(config), "threat_model": threat, "url": oracle_url,
                           "adversarial_set": cache})
        hit = self._cached(key, fp)
        if hit is not None:
            return hit
        base = {"config": config.name, "attack": attack, "eps": eps, "threat_model": threat,
                "adaptive": a.adaptive}
        reason = self.skip_reason(config.name, attack)
        if reason is not None:
            return self._store(key, fp, {**base, "status": "skipped", "reason": reason})
        x_adv, gen_seconds = self._adversarial(attack, tm, ctx, cache)
        t0 = time.perf_counter()
        ans = _run_served(served, x_adv, s.batch_size)
        y = np.asarray(self.y.tolist())
        verdict, pred = np.asarray(ans["verdict"]), np.asarray(ans["pred"])
        rejected = verdict == REJECTED
        clean_ok = (np.asarray(clean["answers"]["pred"]) == y) & (np.asarray(clean["answers"]["verdict"]) != REJECTED)
        fooled = ~rejected & (pred != y)
        backbone_acc = self._backbone_accuracy(x_adv)
        metrics = {
            "robust_accuracy": float((rejected | (pred == y)).mean()),
            "attack_success_rate": float(fooled[clean_ok].mean()) if clean_ok.any() else 0.0,
            "rejection_rate": float(rejected.mean()),
            "accepted_and_correct": float((~rejected & (pred == y)).mean()),
            "backbone_accuracy_on_these_examples": backbone_acc,
            "generation_seconds": gen_seconds,
        }
        thresholds = {st.name: float(st.defense.threshold) for st in split_stages(served.stages)[0]
                      if st.defense.threshold is not None}
        detectors = _detector_metrics(clean["answers"], ans, thresholds)
        extra: dict[str, Any] = {}
        if attack == "square":
            extra["oracle"] = (f"grpc://{s.url}" if s.url is not None and config.name == s.url_config
                               else "local served pipeline")
        if attack == "joint":
            extra["detectors_without_gradient"] = self._detectors_without_gradient(twin)
        scoring = time.perf_counter() - t0
        # wall time of the cell: its examples' generation (summed over their batches, wherever they ran;
        # a backbone attack's examples are shared by every configuration and counted in each) + scoring
        return self._store(key, fp, {**base, "status": "done", "metrics": metrics, "detectors": detectors,
                                 "wall_seconds": gen_seconds + scoring, "scoring_seconds": scoring,
                                 "answers": ans, **extra})

    def _detectors_without_gradient(self, twin: PipelineTwin) -> list[str]:
        x = self.x[:2].to(self.device).requires_grad_(True)
        return [name for name, sc in twin.detector_scores(x).items() if not sc.requires_grad]

    # ---- the matrix -------------------------------------------------------------------------
    def config(self, name: str) -> NamedPipeline:
        return next(c for c in self.configs if c.name == name)

    def run(self, parallel: int = 1) -> dict[str, Any]:
        """The whole matrix. ``parallel`` > 1: the cells are first computed by that many worker
        processes into the cache (attacks/parallel.py), then assembled here as usual."""
        s = self.settings
        plan = []
        for cfg in self.configs:
            for attack in s.attacks:
                for eps in (s.eps_l2 if ATTACKS[attack].norm == "l2" else s.eps):
                    plan.append((cfg, attack, eps))
        if parallel > 1:
            from robustgate.attacks.parallel import fill_cache

            with tqdm(total=len(plan) + len(self.configs), desc=f"eval x{parallel}", unit="cell",
                      disable=not self.progress) as filling:
                fill_cache(self, [(c.name, a, e) for c, a, e in plan], parallel,
                           on_done=lambda label: filling.update(1))
        result: dict[str, Any] = {
            "bundle": {"path": str(self.bundle.root), "name": self.bundle.name,
                       "backbone_sha256": self.bundle.backbone_id},
            "n": s.n, "offset": s.offset, "data": f"{self.data_name} test set",
            "settings": {**{k: v for k, v in asdict(s).items() if k != "channel"},  # never the token
                         "channel": None if s.channel is None else s.channel.describe()},
            "configs": {}, "cells": [],
            # attacks that did not run on this bundle and why (a bundle without a torch twin)
            "skipped_attacks": self.skipped_attacks(), "transfer_from": self.transfer_from,
        }
        bar = tqdm(total=len(plan) + len(self.configs), desc="eval", unit="cell", disable=not self.progress)
        for cfg in self.configs:
            served, twin = self.built[cfg.name]
            clean = self._clean(cfg, served)
            bar.update(1)
            detectors, purifiers, _ = split_stages(served.stages)
            result["configs"][cfg.name] = {
                "stages": cfg.stages, "failure_policy": cfg.failure_policy, "clean": clean["metrics"],
                "randomized": _randomized(served.stages),
                "non_differentiable": [st.name for st in purifiers if not st.defense.differentiable],
                "detectors": {st.name: {"threshold": st.defense.threshold, "action": st.action} for st in detectors},
                "clean_scores": clean["answers"]["scores"],
            }
            if self.surface_points and twin is not None:
                radius = max(s.eps) if s.eps else 0.3
                result.setdefault("loss_surfaces", {})[cfg.name] = [
                    loss_surface(twin, self.x[i:i + 1].to(self.device), self.y[i:i + 1].to(self.device), radius,
                                 seed=s.seed + i)
                    for i in range(min(self.surface_points, len(self.x)))
                ]
            for c, attack, eps in plan:
                if c is not cfg:
                    continue
                bar.set_postfix_str(f"{cfg.name} {attack} eps={eps:g}")
                cell = self._cell(cfg, served, twin, clean, attack, eps)
                result["cells"].append({k: v for k, v in cell.items() if k not in ("answers", "schema")})
                bar.update(1)
        bar.close()
        return result


def loss_surface(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, grid: int = 11,
                 seed: int = 0) -> dict[str, Any]:
    """Cross-entropy of ``model`` on the plane ``x + a*g + b*r`` around one test point.

    ``x`` ``[1, C, H, W]``; ``g`` = sign of the loss gradient (through BPDA surrogates), ``r`` = a
    random sign direction; ``a, b`` in ``[-radius, radius]`` (``grid`` values each, points
    clipped to the box). A smooth bowl rising along ``g`` is what honest gradients look like; a
    flat or jagged surface next to a steep random direction is the visual sign of gradient
    masking (Athalye et al. 2018)."""
    xg = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xg), y)
    (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    g = torch.zeros_like(x) if g is None else g.sign()
    gen = torch.Generator().manual_seed(seed)
    r = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1).to(x.device)  # same draw on every device
    steps = torch.linspace(-radius, radius, grid)
    a, b = (t.to(x.device) for t in torch.meshgrid(steps, steps, indexing="ij"))  # [G, G]
    pts = (x + a.reshape(-1, 1, 1, 1) * g + b.reshape(-1, 1, 1, 1) * r).clamp(0, 1)  # [G*G, C, H, W]
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(pts), y.expand(len(pts)), reduction="none")
    return {"steps": steps.tolist(), "loss": losses.view(grid, grid).tolist(),
            "gradient_is_zero": bool((g == 0).all())}
