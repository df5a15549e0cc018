"""SafetyNet: an RBF-SVM on quantized late-stage ReLU codes (Lu, Issaranon & Forsyth,
"SafetyNet: Detecting and Rejecting Adversarial Examples Robustly", ICCV 2017).

Adversarial examples push the backbone's late-stage ReLU units into activation patterns unlike
those of clean images. SafetyNet quantizes those activations into discrete codes and trains an
RBF-kernel SVM to tell codes of clean images from codes of adversarial ones:

1. ``a = classifier.features(x)`` flattened to ``[N, D]``: late-stage ReLU activations, read from
   the output that the bundle's ``backbone.features_output`` names (every robustgate backbone
   exports one called ``features``; for an imported model, ``robustgate import --features-output
   NAME`` names one of its graph's outputs, e.g. a ``[N, C, h, w]`` feature map, flattened here).
   The proxy reads it from the ONNX graph (``runtime: onnx`` or not), ``fit`` and the red team
   from the torch twin. A bundle that names no feature output cannot run SafetyNet: ``fit`` and
   the pipeline assembly refuse it with a message naming what is missing (``needs_features``).
2. Codes: each unit is quantized against per-unit thresholds fitted on clean training images --
   ``levels=2``: active or not (``a > 0``, the paper's binary code); ``levels=L > 2``: the
   thresholds are ``0`` and the ``1/(L-1) .. (L-2)/(L-1)`` quantiles of that unit's positive
   clean activations; ``code = (#thresholds exceeded) / (L - 1)`` in ``[0, 1]``.
3. An RBF SVM (scikit-learn ``SVC``) is trained on codes of clean training images (label 0) and
   of adversarial versions of *other* training images (label 1) made on the torch twin by
   several attacks (torchattacks: FGSM, PGD and DeepFool by default; CW also available) at the
   ``eps`` values given. With ``positives="fooling"`` (default) only the adversarial versions
   that actually change the backbone's answer are positives: against an adversarially trained
   backbone most attacked images are still classified correctly, and their codes are clean-like
   (measured: with every attacked image as a positive the SVM detected 2.6% of PGD eps 0.1,
   bench/results/detect.md). ``positives="all"`` keeps every attacked image (the first version).
4. Score = the SVM's decision value (signed distance-like margin; > 0 means "adversarial" to the
   SVM). The threshold is calibrated on clean validation codes like every detector's.

Runtimes: ``fit`` exports the SVM to ONNX with skl2onnx (``svm.onnx``, what the proxy runs in
ONNX Runtime with ``runtime: onnx``) and writes the support vectors, dual coefficients, gamma,
intercept and quantization thresholds as safetensors (``svm.safetensors``), from which
``runtime="torch"`` (default) computes the same decision value in torch. Quantization has zero
gradient almost everywhere, so the torch score carries a straight-through (BPDA) gradient: the
forward value is the hard code, the backward pass uses a sigmoid relaxation of the step
(``differentiable = False`` says the gradient is a surrogate). Serving cost: ONNX Runtime's
``SVMClassifier`` kernel (what skl2onnx emits) evaluates the 805 support vectors of the default
bundle's detector ~5x slower than the torch path's ``cdist`` + matrix product: through the proxy
at batch 64 SafetyNet adds +170% with ``runtime: onnx`` and +32% with ``runtime: torch``
(bench/results/detect.proxy_cost.safetynet_runtime.md) -- serve it with the torch runtime.

Upstream mode: when the proxy forwards classification to an upstream V2 server, the activations
are not available from the upstream; SafetyNet reads them from the bundle's *local* copy of the
backbone (its ONNX graph's ``features`` output, run in-process), which must be the same network
the upstream serves -- the bundle's checksums tie them together, the operator must keep the
upstream's model in sync.

Known limits: the paper evaluates against non-adaptive attacks and a type of attack that
targets the detector; Carlini & Wagner (2017, "Adversarial Examples Are Not Easily Detected")
show that detectors of this family are bypassed by attacks that include the detector in the
loss. The SVM is trained on the attacks listed; unseen attacks or budgets can be missed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustgate.defenses.base import Classifier, Detector, FitData, check_images, register
from robustgate.defenses.runtime import OnnxModel, check_runtime

ATTACKS = ("fgsm", "pgd", "deepfool", "cw")
POSITIVES = ("fooling", "all")


# ---- pure functions --------------------------------------------------------------------------------
def fit_quantizer(acts: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-unit thresholds ``[L-1, D]`` from clean activations ``[N, D]`` (module docstring, 2)."""
    d = acts.shape[1]
    rows = [torch.zeros(d)]
    for j in range(1, levels - 1):
        q = j / (levels - 1)
        # quantile of the positive activations of each unit; units never active keep +inf
        masked = torch.where(acts > 0, acts, torch.nan)
        t = torch.nanquantile(masked.double(), q, dim=0).float()  # [D]
        rows.append(torch.nan_to_num(t, nan=float("inf")))
    return torch.stack(rows)  # [L-1, D]


def quantize(acts: torch.Tensor, thresholds: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Codes in ``[0, 1]``: ``[N, D]`` activations, ``[L-1, D]`` thresholds -> ``[N, D]``.

    Forward value: the hard code ``#(a > t_l) / (L - 1)``; gradient: that of the sigmoid
    relaxation ``sum_l sigmoid((a - t_l) / temperature) / (L - 1)`` (straight-through)."""
    diff = acts.unsqueeze(1) - thresholds.unsqueeze(0)  # [N, L-1, D]
    hard = (diff > 0).to(acts.dtype).mean(1)  # [N, D]
    if not acts.requires_grad:
        return hard
    soft = torch.sigmoid(diff.clamp(-1e4, 1e4) / temperature).mean(1)
    return soft + (hard - soft).detach()


def rbf_decision(codes: torch.Tensor, support: torch.Tensor, dual_coef: torch.Tensor,
                 intercept: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The binary SVC decision value ``sum_i alpha_i y_i exp(-gamma ||z - s_i||^2) + b``:
    codes ``[N, D]``, support ``[S, D]``, dual_coef ``[S]`` -> ``[N]``."""
    d2 = torch.cdist(codes.double(), support.double()).pow(2)  # [N, S]
    return (torch.exp(-gamma.double() * d2) @ dual_coef.double() + intercept.double()).to(codes.dtype)


class _LogitsModule(nn.Module):
    """torchattacks wants an ``nn.Module``; this one calls the Classifier's ``logits``."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier
        # a parameter-less stand-in so torchattacks can read the device from .parameters()
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(x)


def make_adversarials(classifier: Classifier, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float,
                      steps: int) -> torch.Tensor:
    """Adversarial versions of ``x`` ``[N, C, H, W]`` by torchattacks on the torch classifier.

    torchattacks is imported here, not at module level: only ``fit`` makes adversarials, and
    serving or attacking a fitted bundle must not need it (issue 23)."""
    import torchattacks

    model = _LogitsModule(classifier).eval().to(x.device)
    if attack == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    elif attack == "pgd":
        atk = torchattacks.PGD(model, eps=eps, alpha=max(eps / 4, 2.5 * eps / steps), steps=steps, random_start=True)
    elif attack == "deepfool":
        atk = torchattacks.DeepFool(model, steps=steps, overshoot=0.02)
    elif attack == "cw":
        atk = torchattacks.CW(model, c=1.0, kappa=0.0, steps=steps * 5, lr=0.01)
    else:
        raise ValueError(f"safetynet: unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    return atk(x, y).detach().clamp(0.0, 1.0)


@register
class SafetyNet(Detector):
    """SafetyNet detector (see module docstring). Flags ``score > threshold``.

    Args:
        levels: quantization levels per unit (2 = the paper's binary code).
        attacks: attacks whose adversarials train the SVM (subset of fgsm, pgd, deepfool, cw).
        eps: L-inf budgets for fgsm/pgd, cycled over the attacked images.
        steps: iterations of pgd/deepfool (cw uses 5x).
        n_fit: training images used (half clean, half attacked, split among the attacks).
        positives: ``"fooling"`` (default: only adversarials that fool the backbone are label 1)
            or ``"all"`` (every attacked image).
        C: SVM regularization; gamma: RBF width (``"scale"`` as scikit-learn, or a float).
        seed: picks the training images.
        runtime: ``"torch"`` (default; straight-through gradient) or ``"onnx"`` (proxy).
        threshold: calibrated threshold.
    """

    kind = "safetynet"
    needs_artifacts: ClassVar[bool] = True
    needs_features: ClassVar[bool] = True  # reads classifier.features (the bundle's features_output)
    differentiable: ClassVar[bool] = False  # quantization: the torch gradient is a BPDA surrogate

    def __init__(self, levels: int = 3, attacks: tuple[str, ...] | list[str] = ("fgsm", "pgd", "deepfool"),
                 eps: tuple[float, ...] | list[float] = (0.05, 0.1, 0.2), steps: int = 10, n_fit: int = 2000,
                 C: float = 1.0, gamma: float | str = "scale", seed: int = 0, runtime: str = "torch",
                 positives: str = "fooling", threshold: float | None = None):
        super().__init__(threshold)
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"safetynet: levels must be an integer >= 2, got {levels!r}")
        attacks = list(attacks)
        if not attacks or any(a not in ATTACKS for a in attacks):
            raise ValueError(f"safetynet: attacks must be a non-empty subset of {', '.join(ATTACKS)}, got {attacks}")
        eps = [float(e) for e in eps]
        if not eps or any(not 0 < e < 1 for e in eps):
            raise ValueError(f"safetynet: eps must be a non-empty list of values in (0, 1), got {eps}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"safetynet: steps must be a positive integer, got {steps!r}")
        if not isinstance(n_fit, int) or n_fit < 4 * len(attacks):
            raise ValueError(f"safetynet: n_fit must be an integer >= {4 * len(attacks)}, got {n_fit!r}")
        if not C > 0:
            raise ValueError(f"safetynet: C must be positive, got {C}")
        if gamma != "scale" and not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"safetynet: gamma must be 'scale' or a positive number, got {gamma!r}")
        if positives not in POSITIVES:
            raise ValueError(f"safetynet: positives must be one of {', '.join(POSITIVES)}, got {positives!r}")
        check_runtime(runtime)
        self.positives = positives
        self.levels, self.attacks, self.eps, self.steps, self.n_fit = levels, attacks, eps, steps, n_fit
        self.C, self.gamma, self.seed, self.runtime = float(C), gamma, int(seed), runtime
        self._svm = None  # sklearn.svm.SVC once fitted (imported in fit: serving needs no scikit-learn)
        self._state: dict[str, torch.Tensor] | None = None  # thresholds, support, dual_coef, intercept, gamma
        self._onnx: OnnxModel | None = None
        self._column = 0  # which ONNX score column holds the decision value (set at export)
        self.fit_report: dict[str, Any] = {}

    # ---- offline ---------------------------------------------------------------------------------
    def fit(self, data: FitData, classifier: Classifier | None = None) -> None:
        """Attacks half of ``n_fit`` training images on ``classifier`` (the torch twin), fits the
        quantizer on the clean half, the SVM on clean vs adversarial codes."""
        if classifier is None:
            raise ValueError("safetynet: fit needs the torch classifier (to read features and to attack)")
        check_images(data.train_x, data.value_range, who="safetynet.fit train_x")
        from sklearn.svm import SVC
        from tqdm.auto import tqdm
        g = torch.Generator().manual_seed(self.seed)
        n = min(self.n_fit, data.train_x.shape[0])
        idx = torch.randperm(data.train_x.shape[0], generator=g)[:n]
        x, y = data.train_x[idx].float(), data.train_y[idx].long()
        half = n // 2
        x_clean, x_atk, y_atk = x[:half], x[half:], y[half:]
        # 1. adversarial examples, the attacked half split among attacks (and eps for fgsm/pgd)
        chunks = torch.arange(x_atk.shape[0]).chunk(len(self.attacks))
        advs, per_attack = [], {}
        jobs = [(attack, e, sub) for attack, rows in zip(self.attacks, chunks)
                for e, sub in zip(self.eps if attack in ("fgsm", "pgd") else [0.0],
                                  rows.chunk(len(self.eps) if attack in ("fgsm", "pgd") else 1))]
        bar = tqdm(jobs, desc="safetynet adversarials", unit="attack", disable=not data.progress, leave=False)
        for attack, e, sub in bar:
            # one attack at one budget on its share of the images
            bar.set_postfix(attack=attack + (f"@{e:g}" if e else ""), images=len(sub))
            adv = make_adversarials(classifier, x_atk[sub], y_atk[sub], attack, e, self.steps)
            with torch.no_grad():
                fooled = classifier.logits(adv).argmax(1) != y_atk[sub]  # [n]
            per_attack[f"{attack}" + (f"@{e:g}" if e else "")] = {
                "n": len(sub), "fooled": round(fooled.float().mean().item(), 4)}
            advs.append(adv[fooled] if self.positives == "fooling" else adv)
        x_adv = torch.cat(advs)
        if x_adv.shape[0] < 2:
            raise ValueError(f"safetynet: only {x_adv.shape[0]} adversarial training examples fooled the backbone "
                             f"({per_attack}); raise n_fit or eps, or use positives='all'")
        # 2. quantizer on clean activations, codes of both sets
        with torch.no_grad():
            a_clean, a_adv = classifier.features(x_clean).flatten(1), classifier.features(x_adv).flatten(1)  # [n, D]
        thresholds = fit_quantizer(a_clean, self.levels)  # [L-1, D]
        codes = torch.cat([quantize(a_clean, thresholds), quantize(a_adv, thresholds)]).numpy()
        labels = np.r_[np.zeros(len(a_clean), dtype=int), np.ones(len(a_adv), dtype=int)]
        # 3. the RBF SVM
        if data.progress:  # one scikit-learn call, no loop to report on: say what runs
            tqdm.write(f"safetynet: fitting the RBF SVM on {len(codes)} codes of {codes.shape[1]} units ...")
        svm = SVC(kernel="rbf", C=self.C, gamma=self.gamma).fit(codes, labels)
        self._svm = svm
        self._state = {
            "thresholds": thresholds.contiguous(),
            "support": torch.from_numpy(svm.support_vectors_.astype(np.float64)),
            "dual_coef": torch.from_numpy(svm.dual_coef_[0].astype(np.float64)),
            "intercept": torch.from_numpy(svm.intercept_.astype(np.float64)),
            "gamma": torch.tensor([float(svm._gamma)], dtype=torch.float64),
        }
        self.fit_report = {"attacks": per_attack, "positives": self.positives, "n_clean": len(a_clean), "n_adv": len(a_adv),
                           "n_support": int(svm.support_vectors_.shape[0]),
                           "train_accuracy": float(svm.score(codes, labels))}

    def save(self, directory: Path) -> dict[str, str]:
        """Writes ``svm.onnx`` (skl2onnx) and ``svm.safetensors`` (torch twin + quantizer)."""
        if self._svm is None or self._state is None:
            raise ValueError("safetynet: nothing to save; call fit first")
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        d = self._state["support"].shape[1]
        onx = to_onnx(self._svm, initial_types=[("codes", FloatTensorType([None, d]))],
                      options={id(self._svm): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
        (directory / "svm.onnx").write_bytes(onx.SerializeToString())
        # skl2onnx writes the binary decision value into one column of its score output; find which
        probe = self._state["support"][: min(64, self._state["support"].shape[0])].float().numpy()
        got = self._onnx_scores(OnnxModel(directory / "svm.onnx", output=_score_output(directory / "svm.onnx")), probe)
        want = self._svm.decision_function(probe)
        column = next((c for c in range(got.shape[1]) if np.allclose(got[:, c], want, atol=1e-3)), None)
        if column is None:
            raise RuntimeError(f"safetynet: the ONNX SVM does not reproduce sklearn's decision values ({got[:3]} vs {want[:3]})")
        self._column = column
        save_file({**{k: v.contiguous() for k, v in self._state.items()},
                   "onnx_column": torch.tensor([column])}, str(directory / "svm.safetensors"))
        return {"svm_onnx": "svm.onnx", "svm_state": "svm.safetensors"}

    def load_artifacts(self, files: dict[str, Path]) -> None:
        missing = {"svm_onnx", "svm_state"} - set(files)
        if missing:
            raise ValueError(f"safetynet: artifacts {sorted(missing)} missing (got {sorted(files)})")
        state = load_file(str(files["svm_state"]))
        self._column = int(state.pop("onnx_column").item())
        if state["thresholds"].shape[0] != self.levels - 1:
            raise ValueError(f"safetynet: artifact has {state['thresholds'].shape[0] + 1} levels, config says {self.levels}")
        self._state = state
        path = Path(files["svm_onnx"])
        self._onnx = OnnxModel(path, output=_score_output(path)) if self.runtime == "onnx" else None

    @staticmethod
    def _onnx_scores(model: OnnxModel, codes: np.ndarray) -> np.ndarray:
        return model.run_numpy(codes.astype(np.float32)).reshape(codes.shape[0], -1)  # [N, 2]

    # ---- online ----------------------------------------------------------------------------------
    def codes(self, x: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, D]`` quantized codes of ``classifier.features(x)``."""
        if self._state is None:
            raise ValueError("safetynet: not fitted (no SVM); run `robustgate fit` or load_artifacts")
        return quantize(classifier.features(x).flatten(1), self._state["thresholds"].to(x.device))

    def score(self, x: torch.Tensor, classifier: Classifier | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N]`` SVM decision values (higher = adversarial)."""
        check_images(x, who="safetynet.score input")
        if classifier is None:
            raise ValueError("safetynet: score needs the classifier (its features(x) are what the SVM reads)")
        z = self.codes(x, classifier)  # [N, D]
        if z.shape[1] != self._state["support"].shape[1]:
            raise ValueError(f"safetynet: the SVM expects {self._state['support'].shape[1]} features, got {z.shape[1]}")
        if self.runtime == "onnx":
            if self._onnx is None:
                raise ValueError("safetynet: runtime 'onnx' needs the svm_onnx artifact (load_artifacts)")
            s = self._onnx_scores(self._onnx, z.detach().cpu().numpy())[:, self._column]
            return torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).to(x.device)
        st = {k: v.to(x.device) for k, v in self._state.items()}
        return rbf_decision(z, st["support"], st["dual_coef"], st["intercept"], st["gamma"])


def _score_output(path: Path) -> str:
    """The name of the score output skl2onnx gave the SVM graph (the second output)."""
    import onnx

    outputs = [o.name for o in onnx.load(str(path)).graph.output]
    if len(outputs) < 2:
        raise ValueError(f"{path}: expected label and score outputs, got {outputs}")
    return outputs[1]
