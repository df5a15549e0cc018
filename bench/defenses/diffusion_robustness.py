"""A small adaptive check of diffusion purification: L-inf PGD with gradients through the DDIM
steps plus EOT over the diffusion noise (torchattacks ``EOTPGD`` on the red team's
``PipelineTwin``), scored on the served ``DefendedModel`` with a fresh diffusion draw, next to
the undefended backbone under PGD with the same budget. A sanity figure on few items; the red
team's ``robustgate eval`` is the reference evaluation.

    .venv/bin/python bench/defenses/diffusion_robustness.py --artifacts /work/diffrun/model \
        --n 64 --eps 0.1 --steps 10 --eot 2 --out bench/results/purify.diffusion_robustness
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchattacks

from robustgate.attacks.differentiable import PipelineTwin
from robustgate.defenses.base import build
from robustgate.defenses.pipeline import REJECTED, DefendedModel, Stage
from robustgate.models.data import load_splits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusion_accuracy import cached_backbone  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--backbone-steps", type=int, default=800)
    ap.add_argument("--backbone-cache", type=Path, default=None)
    ap.add_argument("--t-star", type=int, default=100)
    ap.add_argument("--ddim-steps", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eot", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/purify.diffusion_robustness"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits = load_splits("fashion-mnist", seed=0)
    backbone = cached_backbone(splits, args.backbone_steps, args.backbone_cache)
    for p in backbone.parameters():
        p.requires_grad_(False)
    x, y = splits.test_x[: args.n], splits.test_y[: args.n]
    purifier = build("diffusion", t_star=args.t_star, steps=args.ddim_steps)
    purifier.load_artifacts({"weights": args.artifacts / "diffusion_unet.safetensors",
                             "config": args.artifacts / "diffusion_unet.json"})
    stages = [Stage("diffusion", purifier)]
    served = DefendedModel(stages, classify=lambda z: backbone(z))
    alpha = 2.5 * args.eps / args.steps

    def served_accuracy(inputs: torch.Tensor) -> float:
        with torch.no_grad():
            r = served(inputs, torch.Generator().manual_seed(123))
        ok = (r.logits.argmax(1) == y) | (r.verdict == REJECTED)
        return float(ok.float().mean())

    with torch.no_grad():
        clean_backbone = float((backbone(x).argmax(1) == y).float().mean())
    clean_pipeline = served_accuracy(x)
    adv_b = torchattacks.PGD(backbone, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)(x, y)
    with torch.no_grad():
        robust_backbone = float((backbone(adv_b).argmax(1) == y).float().mean())
    transfer = served_accuracy(adv_b)  # non-adaptive: backbone PGD sent through the pipeline
    twin = PipelineTwin(backbone, stages, bpda=True)
    adv_p = torchattacks.EOTPGD(twin, eps=args.eps, alpha=alpha, steps=args.steps, eot_iter=args.eot,
                                random_start=True)(x, y)
    assert (adv_p - x).abs().max() <= args.eps + 1e-6
    robust_pipeline = served_accuracy(adv_p)
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "threat_model": {"norm": "linf", "eps": args.eps, "attack": "PGD (backbone) / EOT-PGD through DDIM (pipeline)",
                         "steps": args.steps, "step_size": alpha, "restarts": 1, "eot": args.eot, "n": args.n,
                         "random_start": True},
        "purifier": purifier.config(), "backbone": f"cnn, standard training, {args.backbone_steps} steps",
        "clean_accuracy": {"backbone": clean_backbone, "pipeline": clean_pipeline},
        "robust_accuracy": {"backbone_pgd": robust_backbone, "pipeline_nonadaptive_transfer": transfer,
                            "pipeline_adaptive_eot_pgd": robust_pipeline},
        "seconds": round(time.perf_counter() - t0, 1),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    tm = result["threat_model"]
    md = [
        "# Diffusion purification: small adaptive check", "",
        f"`{result['command']}` at {result['time_utc']} ({result['seconds']} s).", "",
        f"Threat model: L-inf eps {tm['eps']}, {tm['steps']} steps of {tm['step_size']:.4f}, random start, 1 restart, "
        f"EOT {tm['eot']} (pipeline attack differentiates through the {args.ddim_steps} DDIM steps from t* = "
        f"{args.t_star}), first {tm['n']} Fashion-MNIST test images; scored on the served pipeline with a fresh draw.", "",
        "| | clean | under attack |", "| --- | ---: | ---: |",
        f"| backbone (undefended), PGD | {100 * clean_backbone:.1f}% | {100 * robust_backbone:.1f}% |",
        f"| diffusion pipeline, non-adaptive (backbone PGD transferred) | {100 * clean_pipeline:.1f}% | {100 * transfer:.1f}% |",
        f"| diffusion pipeline, adaptive EOT-PGD through DDIM | {100 * clean_pipeline:.1f}% | {100 * robust_pipeline:.1f}% |",
    ]
    Path(f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
