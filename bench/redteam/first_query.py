"""How often Square's first perturbed query succeeds through the per-query stages alone: the part of
the endpoint red team's Square line (issue 22; docs/EVALUATION.md) that no query history can lower.

ART's Square (l-inf; art/attacks/evasion/square_attack.py) first queries the clean image, then its
starting point: the image plus ``eps`` times a random sign per channel and column (vertical
stripes), clipped to the value range. That is the attack's second distinct query. A stateful stage
that lets a benign client send ``k - 1`` near-copies of one picture (the k-NN method, ``k`` 4) cannot
flag it; only the per-query stages (MagNet in deploy/default.yaml) stand in its way. This script
draws that starting point ``--draws`` times for each of the first ``--n`` test images of
``--bundle`` and runs clean images and starting points through the pipeline the proxy builds
(defenses/assemble.py ``build_runner``, as bench/stateful/stage_cpu.py builds it) for each
configuration: no stage (the model alone) and each of ``--stages``. Over the draws of the images the
pipeline classifies and accepts clean, it counts the starting points the model misclassifies and
the pipeline accepts (an exact binomial 95% interval beside each share).

    python bench/redteam/first_query.py --bundle WORK/bundle --out bench/results/redteam.first_query
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "hardening"))
sys.path.insert(0, str(REPO / "bench" / "stateful"))
sys.path.insert(0, str(REPO / "bench" / "redteam"))
from common import machine  # noqa: E402  (bench/hardening/common.py)
from stage_cpu import build  # noqa: E402  (the runner as `robustgate serve` builds it)
from endpoint import bundle_record  # noqa: E402  (bench/redteam/endpoint.py: what was attacked)

from robustgate.defenses.pipeline import ACCEPTED  # noqa: E402
from robustgate.models.bundle import Bundle  # noqa: E402
from robustgate.models.data import bundle_splits  # noqa: E402


def starting_points(x: np.ndarray, eps: float, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """ART Square's l-inf starting point for ``x`` ``[N, C, H, W]``: ``x + eps * s`` with a random sign
    ``s`` per item, channel and column (one per ``[N, C, 1, W]``), clipped to ``[lo, hi]``."""
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(x.shape[0], x.shape[1], 1, x.shape[3]))
    return np.clip(x + eps * signs, lo, hi).astype(np.float32)


def share(k: int, n: int) -> dict:
    """``k`` of ``n`` with its exact (Clopper-Pearson) 95% interval."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact") if n else None
    return {"k": k, "n": n, "share": k / n if n else None,
            "ci95": [ci.low, ci.high] if ci is not None else None}


def measure(runner, x: np.ndarray, y: np.ndarray, eps: float, lo: float, hi: float, draws: int, batch: int,
            seed: int, progress: bool) -> dict:
    """One configuration: counts over ``draws`` starting points per image (the same draws for every
    configuration: ``seed``)."""
    rng = np.random.default_rng(seed)
    eligible = flipped = through = 0
    clean = runner(torch.from_numpy(x))  # once: the clean answers do not depend on the draw
    correct = (clean.logits.argmax(1).numpy() == y) & (np.asarray(clean.verdict) == ACCEPTED)
    with tqdm(total=draws * len(x), desc="starting points", disable=not progress, unit="img") as bar:
        for _ in range(draws):
            for at in range(0, len(x), batch):
                xb, yb, ok = x[at:at + batch], y[at:at + batch], correct[at:at + batch]
                res = runner(torch.from_numpy(starting_points(xb, eps, lo, hi, rng)))
                wrong = ok & (res.logits.argmax(1).numpy() != yb)
                eligible += int(ok.sum())
                flipped += int(wrong.sum())
                through += int((wrong & (np.asarray(res.verdict) == ACCEPTED)).sum())
                bar.update(len(xb))
    return {"flipped": share(flipped, eligible), "flipped_and_accepted": share(through, eligible)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Square's starting point through the per-query stages", "",
        f"Command: `{result['command']}` ({result['started_utc']}, revision {m.get('robustgate_revision')}); "
        f"machine: {m.get('cpu')}, {m.get('cores')} cores.", "",
        f"Bundle `{result['bundle']}` ({result['bundle_note'] or 'no note'}; backbone sha256 "
        f"`{result['bundle_record']['backbone_sha256']}`); "
        f"the first {result['n']} "
        f"test images, {result['draws']} draw(s) of ART Square's l-inf starting point each (ε {result['eps']}: "
        "the image plus ε times a random sign per channel and column, clipped to the value range; the same "
        "draws for every configuration). Counted over the draws of the images the configuration classifies "
        "correctly and accepts clean: the starting points the model misclassifies, and those the pipeline "
        "also accepts (what the attacker would read as a success at its second distinct query, before a "
        "stateful stage that allows k - 1 = 3 near-copies of a picture can flag anything).", "",
        "| configuration | draws counted | misclassified | misclassified and accepted (95% CI) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in result["configurations"].items():
        f, t = r["flipped"], r["flipped_and_accepted"]
        lines.append(f"| {name} | {f['n']:,} | {100 * f['share']:.1f}% | {100 * t['share']:.2f}% "
                     f"({100 * t['ci95'][0]:.2f}-{100 * t['ci95'][1]:.2f}%) |")
    fitted = result["bundle_record"]["defenses"]
    lines += ["", "Stages (as served; their fit from bundle.yaml):", ""]
    lines += [f"- `{n}`: {json.dumps(s)}; threshold {fitted.get(n, {}).get('threshold')}, calibration "
              f"{json.dumps(fitted.get(n, {}).get('calibration'))}" for n, s in result["stages"].items()]
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Both shares per configuration with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configurations"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    series = (("flipped", "misclassified"), ("flipped_and_accepted", "misclassified and accepted"))
    for j, (key, label) in enumerate(series):
        vals = [100 * result["configurations"][n][key]["share"] for n in names]
        ci = [[100 * result["configurations"][n][key]["ci95"][i] for n in names] for i in (0, 1)]
        err = [np.subtract(vals, ci[0]), np.subtract(ci[1], vals)]
        ax.bar(np.arange(len(names)) + 0.38 * j, vals, 0.38, yerr=err, capsize=3, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.19, [n.strip("`") for n in names])
    ax.set_ylabel("% of correctly classified draws")
    ax.set_title(f"Square's starting point (l-inf {result['eps']}), {result['n']} images x {result['draws']} draws")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--bundle-note", default="", help="how the bundle was made (goes into the report)")
    ap.add_argument("--stages", default="magnet_l1",
                    help="comma-separated fitted per-query stages of the bundle, each a configuration (action reject)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "redteam.first_query")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bundle = Bundle.load(args.bundle)
    x, y = bundle_splits(bundle).take("test", args.n, 0)
    x, y = np.ascontiguousarray(x.numpy(), dtype=np.float32), y.numpy()
    lo, hi = (float(v) for v in bundle.input.value_range)
    eps = args.eps * (hi - lo)
    stages = {name: {"name": name, "kind": bundle.defense(name).kind, "action": "reject",
                     **({"params": {"runtime": "onnx"}} if bundle.defense(name).kind == "magnet" else {})}
              for name in args.stages.split(",") if name}
    configs = {"no stage (the model alone)": [], **{f"`{n}`": [s] for n, s in stages.items()}}
    results = {}
    for name, cfg in configs.items():
        print(f"{name} ...", flush=True)
        results[name] = measure(build(args.bundle, bundle, cfg), x, y, eps, lo, hi, args.draws, args.batch,
                                args.seed, args.progress)
    result = {"command": "python bench/redteam/first_query.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "started_utc": started, "machine": machine(), "bundle": str(args.bundle), "bundle_note": args.bundle_note,
              "bundle_record": bundle_record(args.bundle, list(stages.values())), "n": len(x),
              "draws": args.draws, "eps": args.eps, "seed": args.seed, "stages": stages, "configurations": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {ext: args.out.with_name(f"{args.out.name}.{ext}") for ext in ("json", "md", "png")}  # OUT has dots
    out["json"].write_text(json.dumps(result, indent=1) + "\n")
    out["md"].write_text(markdown(result) + f"\n![shares]({out['png'].name})\n")
    plot(result, out["png"])
    print(f"wrote {out['json']}, {out['md']} and {out['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
