"""Detection figures on a fitted bundle: TPR at the calibrated FPR, ROC AUC and clean false
rejection, against non-adaptive attacks (PGD by default; FGSM, CW-L2, DeepFool with --attacks) made on the bundle's torch backbone (issue 5 targets:
TPR >= 95% at 1% FPR against PGD L-inf eps 0.1; clean false rejection on the test set <= 1.5%).

    .venv/bin/python bench/detect/measure.py --bundle bundles/default \\
        --stages magnet_l1 --n-test 1000 --n-slow 300 --attacks fgsm pgd cw deepfool \\
        --out bench/results/detect.measure.magnet      # writes OUT.json and OUT.md

Each named stage is a detector fitted into the bundle by `robustgate fit` (threshold from
bundle.yaml, runtime as fitted unless --runtime). "any" is the pipeline's verdict when all the
named stages reject: an item is rejected when any stage's score exceeds its threshold. The attack
is non-adaptive: PGD (torchattacks, random start, ``--steps`` steps of eps/4 capped at 2.5*eps/steps)
against the undefended backbone; the detector is not in the attacker's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchattacks

from robustgate.defenses import calibration as cal
from robustgate.defenses.base import build
from robustgate.defenses.cli import score_batches
from robustgate.models.bundle import Bundle
from robustgate.models.data import recipe_splits
from robustgate.models.twin import TorchClassifier, load_backbone


ATTACKS = ("fgsm", "pgd", "cw", "deepfool")


def markdown(r: dict) -> str:
    """The results file's Markdown twin: the command, the machine and one row per attack and stage."""
    lines = [f"# Detection figures: {', '.join(r['stages'])} on `{r['bundle']}`", "",
             f"Command: `{r.get('command', 'not recorded')}`; started {r.get('started_utc', 'not recorded')}; "
             f"machine: {r.get('machine', 'not recorded')}.", "",
             "| stage | threshold | test false rejection |", "| --- | --- | --- |"]
    for n, st in r["stages"].items():
        lines.append(f"| {n} | {st['threshold']:.6g} | {100 * st['test_false_rejection']:.2f}% |")
    lines += ["", "| attack (non-adaptive, on the backbone) | items | backbone acc. under attack | stage | TPR at calibrated FPR "
              "| TPR on fooling items | AUC | backbone + detectors robust |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, cell in r["attacks"].items():
        for n, st in cell["stages"].items():
            fool = "" if st["tpr_on_fooling_items"] is None else f"{100 * st['tpr_on_fooling_items']:.1f}%"
            lines.append(f"| {key} | {cell['threat']['n']:,} | {100 * cell['backbone_adv_accuracy']:.1f}% | {n} "
                         f"| {100 * st['tpr_at_calibrated_fpr']:.1f}% | {fool} | {st['auc']:.4f} "
                         f"| {100 * cell['backbone_plus_detectors_robust_accuracy']:.1f}% |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, revision {rev or 'unknown'}"


def make_attack(module, attack: str, eps: float | None, steps: int):
    """The torchattacks attack and its threat-model record. fgsm/pgd: L-inf at ``eps`` (pgd:
    ``steps`` steps of min(eps/4, 2.5 eps/steps), random start); cw: CW-L2 (c=1, kappa=0, 100 Adam
    steps of 0.01); deepfool: L2, 50 steps, overshoot 0.02 -- both minimal-perturbation, unbounded."""
    if attack == "fgsm":
        return torchattacks.FGSM(module, eps=eps), {"attack": "fgsm", "norm": "linf", "eps": eps}
    if attack == "pgd":
        alpha = min(eps / 4, 2.5 * eps / steps)
        return (torchattacks.PGD(module, eps=eps, alpha=alpha, steps=steps, random_start=True),
                {"attack": "pgd", "norm": "linf", "eps": eps, "steps": steps, "step_size": alpha, "restarts": 1})
    if attack == "cw":
        return (torchattacks.CW(module, c=1.0, kappa=0.0, steps=100, lr=0.01),
                {"attack": "cw", "norm": "l2", "c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01})
    if attack == "deepfool":
        return (torchattacks.DeepFool(module, steps=50, overshoot=0.02),
                {"attack": "deepfool", "norm": "l2", "steps": 50, "overshoot": 0.02})
    raise ValueError(f"unknown attack {attack!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--stages", nargs="+", required=True)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--attacks", nargs="+", default=["pgd"], choices=list(ATTACKS),
                   help="non-adaptive attacks on the backbone (fgsm/pgd at each --eps; cw = CW-L2, deepfool = L2)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1])
    p.add_argument("--n-slow", type=int, default=None,
                   help="items attacked by cw and deepfool (default: --n-test; they cost ~50x pgd's time)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--runtime", choices=["torch", "onnx"], default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md (e.g. bench/results/detect.measure.magnet)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    bundle = Bundle.load(args.bundle)
    splits = recipe_splits(bundle.spec.backbone.recipe)
    module = load_backbone(bundle)
    clf = TorchClassifier(module)
    x, y = splits.test_x, splits.test_y
    dets = {}
    for name in args.stages:
        spec = bundle.defense(name)
        params = {**spec.params, **({"runtime": args.runtime} if args.runtime else {})}
        det = build(spec.kind, **params)
        det.load_artifacts({role: bundle.path(art) for role, art in spec.files.items()})
        det.threshold = spec.threshold
        dets[name] = det

    result = {"command": " ".join(["python", *sys.argv]), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "bundle": str(args.bundle), "stages": {}, "attacks": {}, "n_test_full": len(x)}
    # clean false rejection on the whole test set
    t0 = time.perf_counter()
    clean_full = {n: score_batches(d, x, clf) for n, d in dets.items()}
    result["clean_scoring_seconds"] = round(time.perf_counter() - t0, 2)
    flagged_any = torch.zeros(len(x), dtype=torch.bool)
    for n, s in clean_full.items():
        hit = s > dets[n].threshold
        flagged_any |= hit
        result["stages"][n] = {"kind": dets[n].kind, "params": bundle.defense(n).params,
                               "threshold": dets[n].threshold,
                               "calibration": {k: v for k, v in (bundle.defense(n).calibration or {}).items() if k != "fit"},
                               "test_false_rejection": hit.float().mean().item()}
    result["any_test_false_rejection"] = flagged_any.float().mean().item()

    # adversarials on a seeded test subset
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: args.n_test]
    xs, ys = x[idx], y[idx]
    runs = [(a, e) for a in args.attacks for e in (args.eps if a in ("fgsm", "pgd") else [None])]
    for attack, eps in runs:
        t0 = time.perf_counter()
        n_items = len(xs) if attack in ("fgsm", "pgd") or args.n_slow is None else min(args.n_slow, len(xs))
        atk, threat = make_attack(module, attack, eps, args.steps)
        torch.manual_seed(0)
        adv = torch.cat([atk(xs[i:min(i + 250, n_items)], ys[i:min(i + 250, n_items)]) for i in range(0, n_items, 250)])
        sub = idx[:n_items]
        with torch.no_grad():
            clean_acc = (module(xs[:n_items]).argmax(1) == ys[:n_items]).float().mean().item()
            fooled = module(adv).argmax(1) != ys[:n_items]  # [n] the attack changed the backbone's answer
            adv_acc = 1.0 - fooled.float().mean().item()
        cell = {"threat": {**threat, "target": "backbone (non-adaptive)", "n": n_items},
                "mean_perturbation": {"linf": (adv - xs[:n_items]).flatten(1).abs().amax(1).mean().item(),
                                      "l2": (adv - xs[:n_items]).flatten(1).norm(dim=1).mean().item()},
                "backbone_clean_accuracy": clean_acc, "backbone_adv_accuracy": adv_acc,
                "attack_seconds": round(time.perf_counter() - t0, 1), "stages": {}}
        caught_any = torch.zeros(n_items, dtype=torch.bool)
        for n, d in dets.items():
            a = score_batches(d, adv, clf)
            c = clean_full[n][sub]
            caught = a > d.threshold
            caught_any |= caught
            cell["stages"][n] = {"tpr_at_calibrated_fpr": caught.float().mean().item(),
                                 "tpr_on_fooling_items": caught[fooled].float().mean().item() if fooled.any() else None,
                                 "auc": cal.roc_auc(c, a)}
        cell["any_tpr"] = caught_any.float().mean().item()
        cell["n_fooling"] = int(fooled.sum())
        # pipeline robust accuracy under this non-adaptive attack: correct or rejected
        cell["backbone_plus_detectors_robust_accuracy"] = ((~fooled) | caught_any).float().mean().item()
        key = f"{attack}_linf_{eps:g}" if eps is not None else f"{attack}_l2"
        result["attacks"][key] = cell
        print(json.dumps({key: cell}, indent=1), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "attacks"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # OUT.json and OUT.md: with_suffix would replace the part after a dot (detect.measure.magnet)
        args.out.with_name(args.out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_name(args.out.name + ".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
