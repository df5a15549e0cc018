"""Detection figures on a fitted bundle: TPR at the calibrated FPR, ROC AUC and clean false
rejection, against non-adaptive PGD made on the bundle's torch backbone (issue 5 targets:
TPR >= 95% at 1% FPR against PGD L-inf eps 0.1; clean false rejection on the test set <= 1.5%).

    .venv/bin/python bench/detect/measure.py --bundle bundles/default \\
        --stages magnet_l1 magnet_l2 --n-test 2000 --out bench/results/detect.json

Each named stage is a detector fitted into the bundle by `robustgate fit` (threshold from
bundle.yaml, runtime as fitted unless --runtime). "any" is the pipeline's verdict when all the
named stages reject: an item is rejected when any stage's score exceeds its threshold. The attack
is non-adaptive: PGD (torchattacks, random start, ``--steps`` steps of eps/4 capped at 2.5*eps/steps)
against the undefended backbone; the detector is not in the attacker's loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchattacks

from robustgate.defenses import calibration as cal
from robustgate.defenses.base import build
from robustgate.defenses.cli import score_batches
from robustgate.models.bundle import Bundle
from robustgate.models.data import load_splits
from robustgate.models.twin import TorchClassifier, load_backbone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--stages", nargs="+", required=True)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--runtime", choices=["torch", "onnx"], default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    bundle = Bundle.load(args.bundle)
    recipe = bundle.spec.backbone.recipe
    splits = load_splits(recipe.get("dataset", "fashion-mnist"), recipe.get("data_dir"),
                         val_size=int(recipe.get("val_size", 5000)), seed=int(recipe.get("seed", 0)))
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

    result = {"bundle": str(args.bundle), "stages": {}, "attacks": {}, "n_test_full": len(x)}
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
    for eps in args.eps:
        t0 = time.perf_counter()
        atk = torchattacks.PGD(module, eps=eps, alpha=min(eps / 4, 2.5 * eps / args.steps), steps=args.steps, random_start=True)
        torch.manual_seed(0)
        adv = torch.cat([atk(xs[i:i + 250], ys[i:i + 250]) for i in range(0, len(xs), 250)])
        with torch.no_grad():
            clean_acc = (module(xs).argmax(1) == ys).float().mean().item()
            fooled = module(adv).argmax(1) != ys  # [n] the attack changed the backbone's answer
            adv_acc = 1.0 - fooled.float().mean().item()
        cell = {"threat": {"attack": "pgd", "norm": "linf", "eps": eps, "steps": args.steps, "restarts": 1,
                           "target": "backbone (non-adaptive)", "n": len(xs)},
                "backbone_clean_accuracy": clean_acc, "backbone_adv_accuracy": adv_acc,
                "attack_seconds": round(time.perf_counter() - t0, 1), "stages": {}}
        caught_any = torch.zeros(len(xs), dtype=torch.bool)
        for n, d in dets.items():
            a = score_batches(d, adv, clf)
            c = clean_full[n][idx]
            caught = a > d.threshold
            caught_any |= caught
            cell["stages"][n] = {"tpr_at_calibrated_fpr": caught.float().mean().item(),
                                 "tpr_on_fooling_items": caught[fooled].float().mean().item() if fooled.any() else None,
                                 "auc": cal.roc_auc(c, a)}
        cell["any_tpr"] = caught_any.float().mean().item()
        cell["n_fooling"] = int(fooled.sum())
        # pipeline robust accuracy under this non-adaptive attack: correct or rejected
        cell["backbone_plus_detectors_robust_accuracy"] = ((~fooled) | caught_any).float().mean().item()
        result["attacks"][f"pgd_linf_{eps:g}"] = cell
        print(json.dumps({f"pgd eps {eps:g}": cell}, indent=1), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "attacks"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
