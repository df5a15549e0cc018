"""Clean accuracy of a backbone after diffusion purification, against t* (and k DDIM steps).

Backbone: the bundle's torch twin (``--bundle``, e.g. bundles/default) or, when none is given, a
standard-trained ``cnn`` trained here for ``--backbone-steps`` Adam steps (batch 128) on the
seeded Fashion-MNIST train split. Purifier: the trained DDPM from ``--artifacts``. Each setting
is evaluated on the first ``--n`` test images with one diffusion draw (generator seed 0).

    .venv/bin/python bench/defenses/diffusion_accuracy.py --artifacts /work/diffrun/model \
        --n 500 --out bench/results/defenses.diffusion_accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from robustgate.defenses.base import build
from robustgate.models.archs import build_arch
from robustgate.models.data import load_splits

SETTINGS = [(0, 2), (25, 2), (50, 2), (100, 1), (100, 2), (100, 5), (150, 2), (200, 2), (300, 2)]


def quick_backbone(splits, steps: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_arch("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(splits.train_x), (128,), generator=g)
        loss = F.cross_entropy(model(splits.train_x[idx]), splits.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def cached_backbone(splits, steps: int, cache: Path | None) -> torch.nn.Module:
    """``quick_backbone``, stored as / loaded from a safetensors state dict at ``cache``."""
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.is_file():
        model = build_arch("cnn")
        model.load_state_dict(load_file(str(cache)))
        return model.eval()
    model = quick_backbone(splits, steps)
    if cache is not None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return model


@torch.no_grad()
def accuracy(model, x, y, batch=250) -> float:
    return float(sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum() for i in range(0, len(x), batch)) / len(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--backbone-steps", type=int, default=800)
    ap.add_argument("--backbone-cache", type=Path, default=None,
                    help="safetensors file: load the quick backbone from it if present, else train and write it")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/defenses.diffusion_accuracy"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits = load_splits("fashion-mnist", seed=0)
    if args.bundle is not None:
        from robustgate.models.twin import load_backbone

        backbone, source = load_backbone(args.bundle), f"bundle {args.bundle}"
    else:
        backbone = cached_backbone(splits, args.backbone_steps, args.backbone_cache)
        source = f"cnn (default widths), standard training, {args.backbone_steps} Adam steps x 128, lr 1e-3, seed 0"
    x, y = splits.test_x[: args.n], splits.test_y[: args.n]
    base = accuracy(backbone, x, y)
    meta = json.loads((args.artifacts / "diffusion_unet.json").read_text())
    rows = []
    for t_star, k in SETTINGS:
        p = build("diffusion", t_star=t_star, steps=k)
        p.load_artifacts({"weights": args.artifacts / "diffusion_unet.safetensors",
                          "config": args.artifacts / "diffusion_unet.json"})
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            purified = torch.cat([p.purify(x[i:i + 100], g) for i in range(0, len(x), 100)])
        acc = accuracy(backbone, purified, y)
        rows.append({"t_star": t_star, "steps": k, "clean_accuracy": acc, "drop_points": 100 * (base - acc),
                     "mean_abs_change": float((purified - x).abs().mean())})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "backbone": source, "n_test": args.n, "backbone_clean_accuracy": base,
        "diffusion_training": meta.get("training"), "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1), "loadavg_end": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    tr = meta.get("training") or {}
    lines = [
        "# Clean accuracy after diffusion purification vs t*", "",
        f"`{result['command']}` at {result['time_utc']}.", "",
        f"Backbone: {source}; clean accuracy {100 * base:.1f}% on the first {args.n} Fashion-MNIST test images.",
        f"DDPM: defaults of defenses/purify/diffusion.py, trained {tr.get('steps')} steps x {tr.get('batch_size')} "
        f"in {tr.get('seconds')} s (final loss {tr.get('loss_curve', [None])[-1]}). One diffusion draw per image.", "",
        "| t* | DDIM steps k | clean accuracy | drop (points) | mean abs pixel change |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['t_star']} | {r['steps']} | {100 * r['clean_accuracy']:.1f}% | {r['drop_points']:.1f} | "
                     f"{r['mean_abs_change']:.4f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
