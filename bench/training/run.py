"""Training benchmark: throughput (images/s) per method, and the default bundle's accuracy.

    .venv/bin/python bench/training/run.py [--steps 8] [--threads 1] [--bundle bundles/default] [--pgd]

1. Throughput: for every method of ``robustgate.models.losses.METHODS`` (standard, fast-at,
   pgd-at, trades, mart; inner steps as given), trains the default bundle's architecture on real
   Fashion-MNIST batches of 128 for ``--steps`` timed steps (after 2 warm-up steps) and reports
   training images per second (one image = one item of the training batch, whatever the
   number of inner attack passes it costs).
2. The default bundle: clean accuracy of the *served* ONNX graph (ONNX Runtime) on the full
   10,000-item test set, and -- with ``--pgd`` -- clean and PGD-20 accuracy (l-inf, eps 0.1,
   step 2.5 eps / 20, 1 random start) of its torch twin on the full test set, re-measured here.
   Without ``--pgd`` the PGD-20 figure is copied from the bundle (measured by the trainer at the
   end of the recipe) and labelled as such.

The machine is shared (load average recorded): throughput figures are lower bounds of what an
idle 2-core machine gives. Writes bench/results/training.run.json and bench/results/training.run.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from robustgate.models.bundle import Bundle
from robustgate.models.data import load_splits
from robustgate.models.inner import robust_accuracy
from robustgate.models.losses import METHODS, passes_per_item
from robustgate.models.train import TrainConfig
from robustgate.models.twin import load_backbone

ROOT = Path(__file__).resolve().parents[2]


def throughput(arch_kwargs: dict, method: str, steps: int, inner_steps: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    from robustgate.models.archs import build_arch

    torch.manual_seed(0)
    model = build_arch("cnn", **arch_kwargs).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = TrainConfig(out="unused", method=method, eps=0.1, steps=inner_steps)
    gen = torch.Generator().manual_seed(0)
    bs = 128

    def step(i: int) -> None:
        xb, yb = x[(i * bs) % len(x):][:bs], y[(i * bs) % len(x):][:bs]
        loss, _ = METHODS[method](model, xb, yb, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(2):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 2)
    dt = time.perf_counter() - t0
    return {"method": method, "inner_steps": inner_steps if method in ("pgd-at", "trades", "mart") else
            (1 if method == "fast-at" else 0), "passes_per_item": passes_per_item(method, inner_steps),
            "images_per_s": round(steps * bs / dt, 1), "timed_steps": steps, "batch_size": bs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "default"))
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per method")
    ap.add_argument("--inner-steps", type=int, default=10, help="inner PGD/TRADES steps for pgd-at, trades, mart")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pgd", action="store_true", help="re-measure PGD-20 on the full test set (minutes)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "training.run"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python bench/training/run.py " + " ".join(sys.argv[1:])

    bundle = Bundle.load(args.bundle)
    spec = bundle.spec.backbone
    arch_kwargs = {k: v for k, v in spec.arch_kwargs.items()}
    splits = load_splits("fashion-mnist", seed=0)
    load_before = os.getloadavg()

    rows = [throughput(arch_kwargs, m, args.steps, args.inner_steps, splits.train_x, splits.train_y) for m in METHODS]
    for r in rows:
        print(json.dumps(r), flush=True)

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(bundle.path(spec.onnx)), so, providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(["logits"], {"input": splits.test_x[i:i + 1000].numpy()})[0].argmax(1)
                            for i in range(0, len(splits.test_x), 1000)])
    onnx_clean = float((preds == splits.test_y.numpy()).mean())
    default = {"bundle": str(Path(args.bundle).relative_to(ROOT)) if Path(args.bundle).is_relative_to(ROOT) else args.bundle,
               "onnx_clean_accuracy_full_test": onnx_clean, "test_items": len(splits.test_x),
               "trainer_metrics": {k: v for k, v in spec.metrics.items() if k != "history"},
               "recipe_command": bundle.spec.provenance.get("command")}
    if args.pgd:
        twin = load_backbone(bundle)
        t0 = time.perf_counter()
        clean, robust = robust_accuracy(twin, splits.test_x, splits.test_y, 0.1, 2.5 * 0.1 / 20, 20, 1, seed=0, progress=True)
        default["remeasured"] = {"clean_accuracy": clean, "pgd20_accuracy": robust, "seconds": round(time.perf_counter() - t0, 1),
                                 "threat_model": "l-inf eps 0.1, PGD-20, step 0.0125, 1 random start, CE loss, torch twin, "
                                                 "full 10k test set, white-box backbone only (no defenses)"}
    result = {
        "command": command, "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                                     "threads": args.threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "arch": spec.arch, "arch_kwargs": arch_kwargs, "throughput": rows, "default_bundle": default,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # OUT.json and OUT.md: with_suffix would replace the part after a dot (training.run -> training.json)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(_markdown(result))
    print(out.with_name(out.name + ".md").read_text())
    return 0


def _markdown(r: dict) -> str:
    d = r["default_bundle"]
    m = d["trainer_metrics"]
    lines = [
        "# Training benchmark", "",
        f"Command: `{r['command']}` (from the repository root, venv python).", "",
        f"Machine: {r['host']['cpus']} CPUs shared with other jobs (load average before "
        f"{', '.join(f'{v:.1f}' for v in r['host']['loadavg_before'])}, after "
        f"{', '.join(f'{v:.1f}' for v in r['host']['loadavg_after'])}); torch {r['host']['torch']}, "
        f"{r['host']['threads']} thread(s). Figures are lower bounds for an idle machine.", "",
        f"## Throughput per method (arch `{r['arch']}` {json.dumps({k: v for k, v in r['arch_kwargs'].items() if k in ('width', 'hidden')})}, batch 128)", "",
        "| method | inner steps | passes / item | training images/s |", "| --- | --- | --- | --- |",
    ]
    lines += [f"| {t['method']} | {t['inner_steps']} | {t['passes_per_item']} | {t['images_per_s']} |" for t in r["throughput"]]
    tm = m.get("threat_model", {})
    lines += [
        "", f"## Default bundle (`{d['bundle']}`)", "",
        f"Recipe: `{d['recipe_command']}`", "",
        "| figure | value | measured by |", "| --- | --- | --- |",
        f"| clean accuracy, served ONNX graph, {d['test_items']} test items | {d['onnx_clean_accuracy_full_test']:.4f} | this benchmark (ONNX Runtime) |",
        f"| clean accuracy, torch twin | {m.get('clean_accuracy')} | trainer, end of recipe |",
        f"| PGD-20 accuracy (l-inf eps {tm.get('eps')}, step {tm.get('step_size')}, {tm.get('restarts')} restart, {tm.get('items')} items) | {m.get('pgd20_accuracy')} | trainer, end of recipe |",
    ]
    if "remeasured" in d:
        rm = d["remeasured"]
        lines += [f"| clean / PGD-20 accuracy re-measured | {rm['clean_accuracy']:.4f} / {rm['pgd20_accuracy']:.4f} | this benchmark ({rm['seconds']} s) |"]
    lines += [
        "", "Threat model: white-box l-inf PGD on the undefended backbone (its torch twin), eps = 0.1 in [0, 1] pixel "
        "units, cross-entropy loss, random start. Not AutoAttack and not an adaptive attack on the defended pipeline "
        "(that is the red team's report). Targets: clean >= 0.85, PGD-20 >= 0.72; anchor: Wong & Kolter (2018) certify "
        "65.5% at 78.3% clean.",
        "", f"Selected epoch {m.get('selected_epoch')} ({m.get('selected_by')}); training throughput during the recipe "
        f"{m.get('train_images_per_s')} images/s over {m.get('processes')} process(es), train time {m.get('train_seconds_this_run')} s, "
        f"wall {m.get('wall_seconds_this_run')} s on the shared machine.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
