"""MIMIR vs adversarial MAE vs MAE + PGD-AT vs PGD-AT from scratch, at equal wall-clock compute.

    # pre-training cost per epoch, MIMIR vs clean MAE (paper Table 10) -> training.mimir_compare.cost.json/.md
    python bench/training/mimir_compare.py cost --budget-minutes 5

    # lambda sweep (one seed, validation PGD-10 robustness picks lambda) -> training.mimir_compare.sweep.json/.md
    python bench/training/mimir_compare.py sweep --budget-minutes 30 --device cpu

    # the comparison (2 seeds x 4 arms, AutoAttack on the same test images, paired tests)
    #   -> bench/results/training.mimir_compare.json/.md/.png (the plot: accuracies, paired CIs)
    python bench/training/mimir_compare.py compare --budget-minutes 9 --device cuda --n-eval 1000

    # the same comparison split over sessions: each trains some arms / seeds for the same planned
    # seconds per model, then one merge -> bench/results/training.mimir_compare.json/.md/.png
    python bench/training/mimir_compare.py compare --arm-seconds 240 --arms mimir,scratch --seeds 0 ... --out PART
    python bench/training/mimir_compare.py merge --parts PART1.json PART2.json ...

Arms (all the same ``vit_tiny``; pre-trained arms fine-tuned with the reference recipe of
``models/vit_finetune.py``: AdamW, layer-wise lr decay 0.65, weight decay 0.05, drop-path 0.1,
warm-up + cosine, mean-pooled head, PGD-10):

  mimir       MIMIR pre-training (1 PGD step of 1.25 eps on the reconstruction, nHSIC penalty with
              the lambda chosen by the sweep, median-heuristic sigma), then PGD-AT fine-tuning;
  mimir-carry the same objective with each image's delta carried across epochs and moved by the
              training step's own input gradient (``models/mimir.py``, ``perturbation="carry"``):
              no extra forward/backward per batch -- an option, not the reference's recipe;
  adv-mae     the same with lambda = 0 (adversarial MAE: the ablation that isolates the MI term);
  mae         clean MAE pre-training, then the same fine-tuning;
  scratch     PGD-AT from a random initialization with the same recipe, no layer decay (1.0: a
              random encoder has nothing to preserve) and the whole arm budget spent on PGD-AT.

Equal compute = equal *wall-clock training seconds* per arm and seed, on one device, planned from
per-step times measured in this process just before training (``calibrate``: a few steps of each
kind, after a warm-up), so it also holds on a GPU where FLOPs and time part ways. Each arm's
budget is ``--budget-minutes * (1 - --eval-share) / (arms * seeds)``; the pre-trained arms spend
``--pretrain-share`` of it pre-training. The realized seconds are recorded beside the plan.

Evaluation: torchattacks' AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; l-inf eps 0.1)
on the first ``--n-eval`` test images, the same for every arm and seed; robust = correct on the
clean image and on the attacked one. Paired tests between arms (per-image outcomes):
McNemar's exact test per seed (binomial on the discordant pairs) and a paired bootstrap 95% CI of
the difference in robust accuracy over the seed-averaged per-image outcomes (images resampled).

Imports only torch, numpy, scipy, tqdm, safetensors, matplotlib and torchattacks (plus this
repository's models/data, archs, mae, hsic, mimir, inner, vit_finetune) -- no pydantic / diffusers
-- so it runs on a bare GPU machine with torchattacks carried as a wheel (docs/MIMIR.md has the command).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def _import_robustgate() -> None:
    """Makes ``import robustgate`` import *this* checkout (the repo root is the package), whatever
    its folder is called and whatever else is installed."""
    if ROOT.name == "robustgate":
        sys.path.insert(0, str(ROOT.parent))
    else:  # a checkout under another name: link it as robustgate in a temporary folder
        link_dir = Path(tempfile.mkdtemp(prefix="rg_path_"))
        (link_dir / "robustgate").symlink_to(ROOT)
        sys.path.insert(0, str(link_dir))


_import_robustgate()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from robustgate.models.archs import build_arch  # noqa: E402
from robustgate.models.data import load_splits  # noqa: E402
from robustgate.models.inner import robust_accuracy  # noqa: E402
from robustgate.models.mae import MaskedAutoencoder  # noqa: E402
from robustgate.models.mimir import (  # noqa: E402
    PAPER_DEFAULTS, ascend, init_classifier, make_loader, mimir_loss, param_groups, pgd_delta, pretrain, scaled_lr,
)
from robustgate.models.vit_finetune import REFERENCE, finetune, param_groups_lrd  # noqa: E402

EPS = 0.1  # this project's threat model: l-inf 0.1 on [0, 1] pixels
PGD_STEP = 1.25 * EPS  # MIMIR's pre-training step: 10/255 for 8/255
LAMS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
ARMS = {"mimir": "MIMIR (chosen lambda) + PGD-AT",
        "mimir-carry": "MIMIR, deltas carried across epochs (chosen lambda) + PGD-AT",
        "adv-mae": "adversarial MAE (lambda 0) + PGD-AT", "mae": "clean MAE + PGD-AT", "scratch": "PGD-AT from scratch"}
DEFAULT_ARMS = ("mimir", "adv-mae", "mae", "scratch")
PRE_KIND = {"mimir": "mimir", "mimir-carry": "mimir-carry", "adv-mae": "adv-mae", "mae": "mae"}  # arm -> calibrated step
PRESETS = {  # encoder sizes that fit the budgets: the real ViT-Tiny (192 x 12) costs hours per epoch on the CPU
    "cpu": dict(dim=64, depth=4, heads=4, patch_size=4),
    "cuda": dict(dim=128, depth=6, heads=4, patch_size=4),
}


# ---- set-up -------------------------------------------------------------------------------------
class Run:
    """Data on the device, the architecture, timing helpers, shared by every phase."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if args.threads:
            torch.set_num_threads(args.threads)
        s = load_splits("fashion-mnist", args.data_dir, val_size=5000, seed=0)
        n_train = args.train_items or len(s.train_x)
        self.train_x, self.train_y = s.train_x[:n_train].to(self.device), s.train_y[:n_train].to(self.device)
        self.val_x, self.val_y = s.val_x[: args.n_val].to(self.device), s.val_y[: args.n_val].to(self.device)
        self.test_x, self.test_y = s.test_x[: args.n_eval].to(self.device), s.test_y[: args.n_eval].to(self.device)
        mean = [round(float(v), 4) for v in s.train_x.mean(dim=(0, 2, 3))]
        std = [round(float(v), 4) for v in s.train_x.std(dim=(0, 2, 3))]
        preset = dict(PRESETS["cuda" if self.device.type == "cuda" else "cpu"])
        for k in ("dim", "depth", "heads", "patch_size"):
            if getattr(args, k) is not None:
                preset[k] = getattr(args, k)
        self.arch = dict(in_channels=1, image_size=28, mean=mean, std=std, **preset)
        self.t_start = time.perf_counter()
        self.started_utc = _started()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def mae(self, seed: int) -> MaskedAutoencoder:
        torch.manual_seed(seed)
        return MaskedAutoencoder(**self.arch).to(self.device)

    def classifier(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_arch("vit_tiny", num_classes=10, pool=REFERENCE["pool"], drop_path=REFERENCE["drop_path"],
                          **self.arch).to(self.device)

    def loader(self, seed: int, indexed: bool = False):
        return make_loader(self.train_x, self.args.batch_size, seed, indexed=indexed)


@functools.lru_cache(maxsize=1)
def revision() -> str:
    """The checkout's commit when first asked: ``main`` asks at the start, so a run of an hour records
    the code it ran, not a commit made while it ran."""
    try:
        import subprocess

        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine(device: torch.device) -> dict:
    """The keys bench/report.py reads (cpu, cores, robustgate_revision) and the device used."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    info = {"cpu": cpu, "cores": os.cpu_count(), "robustgate_revision": revision(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "load_average_at_end": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _started() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- calibration: seconds per step of each kind ------------------------------------------------
def calibrate(run: Run, lam: float, repeats: int) -> dict[str, float]:
    """Median wall seconds of one batch of: PGD AT, clean MAE, adversarial MAE / MIMIR (/ MIMIR with
    carried deltas) pre-training."""
    b = run.args.batch_size
    x, y = run.train_x[:b], run.train_y[:b]
    clf, mae = run.classifier(0), run.mae(0)
    opt_c = torch.optim.AdamW(param_groups_lrd(clf, 0.05, 1.0), lr=1e-4)
    opt_m = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    from robustgate.models.inner import pgd

    def at_step():
        k = run.args.ft_pgd_steps
        x_adv = pgd(clf, x, y, EPS, 2.5 * EPS / k, k, generator=torch.Generator(device=run.device).manual_seed(0))
        clf.train()
        loss = torch.nn.functional.cross_entropy(clf(x_adv), y)
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()

    def pre_step(eps: float, lam_: float):
        masking = mae.sample_masking(b, generator=gen)
        delta = pgd_delta(mae, x, masking, eps=eps, steps=1 if eps else 0, step_size=PGD_STEP, generator=gen)
        loss, _, _ = mimir_loss(mae, x, delta, masking, lam=lam_, sigma=run.args.sigma, estimator=run.args.estimator)
        opt_m.zero_grad()
        loss.backward()
        opt_m.step()

    def carry_step(lam_: float):
        masking = mae.sample_masking(b, generator=gen)
        delta = ((2 * torch.rand(x.shape, generator=gen) - 1) * EPS).to(run.device).requires_grad_(True)
        loss, _, _ = mimir_loss(mae, x, delta, masking, lam=lam_, sigma=run.args.sigma, estimator=run.args.estimator)
        opt_m.zero_grad()
        loss.backward()
        opt_m.step()
        with torch.no_grad():
            ascend(x, delta.detach(), delta.grad, eps=EPS, step_size=PGD_STEP)

    kinds = {"pgd-at": at_step, "mae": lambda: pre_step(0.0, 0.0), "adv-mae": lambda: pre_step(EPS, 0.0),
             "mimir": lambda: pre_step(EPS, lam if lam > 0 else 1e-4),
             "mimir-carry": lambda: carry_step(lam if lam > 0 else 1e-4)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats + 1):  # round 0 warms up (allocations, kernels) and is dropped
        for k, f in kinds.items():
            run.sync()
            t0 = time.perf_counter()
            f()
            run.sync()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


# ---- one arm ------------------------------------------------------------------------------------
def train_arm(run: Run, arm: str, seed: int, lam: float, seconds: float, per_step: dict[str, float]) -> tuple:
    """Trains one arm for ~``seconds`` of wall clock; returns (classifier, record)."""
    a = run.args
    record: dict = {"arm": arm, "seed": seed, "planned_seconds": round(seconds, 2)}
    pre_kind = PRE_KIND.get(arm)
    ft_seconds = seconds if pre_kind is None else seconds * (1 - a.pretrain_share)
    clf = run.classifier(seed)
    if pre_kind is not None:
        pre_steps = max(1, int(seconds * a.pretrain_share / per_step[pre_kind]))
        mae = run.mae(seed)
        carry = arm == "mimir-carry"
        loader = run.loader(seed, indexed=carry)
        epochs = math.ceil(pre_steps / len(loader))
        mimir_arm = arm in ("mimir", "mimir-carry")
        t0 = time.perf_counter()
        res = pretrain(
            mae, loader, epochs=epochs, max_steps=pre_steps, eps=0.0 if arm == "mae" else EPS,
            steps=0 if arm == "mae" else 1, step_size=0.0 if arm == "mae" else PGD_STEP,
            lam=lam if mimir_arm else 0.0, sigma=a.sigma, estimator=a.estimator,
            lr=scaled_lr(a.pretrain_blr, a.batch_size), perturbation="carry" if carry else "pgd",
            seed=seed, device=run.device, progress=a.progress,
        )
        run.sync()
        record["pretrain"] = {
            "steps": pre_steps, "seconds": round(time.perf_counter() - t0, 2), "lam": lam if mimir_arm else 0.0,
            "rec_loss_per_epoch": res.rec_losses, "mi_per_epoch": res.mi, "mi_share_per_epoch": res.mi_share,
            "seconds_per_epoch": res.seconds, "pgd_seconds_per_epoch": res.pgd_seconds, "config": res.config,
        }
        init_classifier(clf, mae)
        del mae
    ft_steps = max(1, int(ft_seconds / per_step["pgd-at"]))
    ft = finetune(clf, run.train_x, run.train_y, steps=ft_steps, batch_size=a.batch_size, eps=EPS,
                  pgd_steps=a.ft_pgd_steps, blr=a.finetune_blr, layer_decay=1.0 if pre_kind is None else REFERENCE["layer_decay"], seed=seed,
                  device=run.device, progress=a.progress, log_every=max(1, ft_steps // 10))
    record["finetune"] = {"steps": ft_steps, "seconds": round(ft.seconds, 2), "loss": ft.loss, "acc": ft.acc,
                          "config": ft.config}
    record["train_seconds"] = round(ft.seconds + record.get("pretrain", {}).get("seconds", 0.0), 2)
    return clf, record


def val_robustness(run: Run, clf: torch.nn.Module) -> tuple[float, float]:
    """(clean, PGD-10) accuracy on the held-out validation images (model selection, never test)."""
    return robust_accuracy(clf, run.val_x, run.val_y, EPS, 2.5 * EPS / 10, 10, seed=0)


# ---- evaluation and paired statistics ------------------------------------------------------------
def autoattack_outcomes(run: Run, clf: torch.nn.Module, lo: int = 0, hi: int | None = None,
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-image (clean correct, robust correct) on eval images [lo:hi] under AutoAttack; seconds."""
    import torchattacks

    clf.eval()
    t0 = time.perf_counter()
    if run.args.attack == "autoattack":
        attack = torchattacks.AutoAttack(clf, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    else:  # apgd-ce: smoke tests only (the report names the attack)
        attack = torchattacks.APGD(clf, norm="Linf", eps=EPS, steps=100, loss="ce", seed=0)
    clean, robust = [], []
    bs = run.args.eval_batch
    hi = len(run.test_x) if hi is None else hi
    for i in tqdm(range(lo, hi, bs), desc="AutoAttack", disable=not run.args.progress, leave=False):
        xb, yb = run.test_x[i:min(i + bs, hi)], run.test_y[i:min(i + bs, hi)]
        with torch.no_grad():
            ok = clf(xb).argmax(1) == yb
        x_adv = attack(xb, yb)
        with torch.no_grad():
            rob = ok & (clf(x_adv).argmax(1) == yb)
        clean.append(ok.cpu().numpy())
        robust.append(rob.cpu().numpy())
    run.sync()
    return np.concatenate(clean), np.concatenate(robust), time.perf_counter() - t0


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of paired binary outcomes a, b [n]: binomial test on the discordant pairs."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_first": only_a, "only_second": only_b, "p_value": float(p)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean difference (a - b) of per-image outcomes [n] (e.g. seed-averaged) and its 95% bootstrap CI."""
    rng = np.random.default_rng(seed)
    d = a.astype(float) - b.astype(float)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"difference": float(d.mean()), "ci95": [float(lo), float(hi)], "resamples": resamples}


def compare_pairs(outcomes: dict[str, dict[int, np.ndarray]]) -> list[dict]:
    """Paired tests of MIMIR against every other arm, and of every arm against scratch, over the
    seeds both arms of a pair were trained with (``outcomes``: arm -> seed -> per-image robust [n])."""
    pairs = [("mimir", "adv-mae"), ("mimir", "mae"), ("mimir", "scratch"), ("adv-mae", "scratch"),
             ("mae", "scratch"), ("mimir-carry", "mimir"), ("mimir-carry", "scratch")]
    out = []
    for first, second in pairs:
        seeds = sorted(set(outcomes.get(first, {})) & set(outcomes.get(second, {})))
        if not seeds:
            continue
        a_seeds, b_seeds = [outcomes[first][s] for s in seeds], [outcomes[second][s] for s in seeds]
        per_seed = [mcnemar_exact(a, b) for a, b in zip(a_seeds, b_seeds)]
        pooled_a, pooled_b = np.concatenate(a_seeds), np.concatenate(b_seeds)
        avg_a, avg_b = np.mean(np.stack(a_seeds), axis=0), np.mean(np.stack(b_seeds), axis=0)
        out.append({"first": first, "second": second, "seeds": seeds, "mcnemar_per_seed": per_seed,
                    "mcnemar_pooled_seeds": mcnemar_exact(pooled_a, pooled_b),
                    "bootstrap_seed_averaged": paired_bootstrap(avg_a, avg_b)})
    return out


# ---- phases -----------------------------------------------------------------------------------------
def sweep(args: argparse.Namespace) -> int:
    run = Run(args)
    lams = [float(v) for v in args.lams.split(",")]
    per_step = calibrate(run, max(lams), args.calibration_steps)
    budget = args.budget_minutes * 60 - run.elapsed()
    # the validation PGD-10 after each arm is ~ n_val/batch * (11/2) AT steps' worth of compute
    val_cost = len(run.val_x) / args.batch_size * per_step["pgd-at"] * 0.5
    seconds = max(1.0, budget / len(lams) - val_cost)
    rows = []
    for lam in tqdm(lams, desc="lambda sweep", disable=not args.progress):
        clf, record = train_arm(run, "mimir" if lam > 0 else "adv-mae", args.seed, lam, seconds, per_step)
        record["lam"] = lam
        record["val_clean"], record["val_pgd10"] = val_robustness(run, clf)
        rows.append(record)
        print(json.dumps({k: record[k] for k in ("lam", "train_seconds", "val_clean", "val_pgd10")}), flush=True)
    best = max(rows, key=lambda r: (r["val_pgd10"], -r["lam"]))  # ties: the smaller lambda
    best_nonzero = max((r for r in rows if r["lam"] > 0), key=lambda r: (r["val_pgd10"], -r["lam"]), default=None)
    report = {
        "what": "MIMIR lambda sweep: MIMIR pre-training + PGD-AT fine-tuning per lambda at equal wall clock, "
                "validation PGD-10 robustness picks lambda",
        "command": "python bench/training/mimir_compare.py " + " ".join(args.argv), "started_utc": run.started_utc,
        "chosen_lam": best["lam"], "chosen_nonzero_lam": best_nonzero["lam"] if best_nonzero else None,
        "ft_pgd_steps": args.ft_pgd_steps, "selected_by": f"validation PGD-10 accuracy on {len(run.val_x)} held-out items",
        "arch": run.arch, "seconds_per_step": per_step, "seconds_per_arm": round(seconds, 2),
        "train_items": len(run.train_x), "batch_size": args.batch_size, "sigma": args.sigma or "median",
        "estimator": args.estimator,
        "rows": rows, "total_seconds": round(run.elapsed(), 1), "budget_seconds": args.budget_minutes * 60,
        "machine": machine(run.device),
    }
    _write(args.out or RESULTS / "training.mimir_compare.sweep", report, _sweep_md(report))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Trains every arm and seed for the same planned seconds, then runs AutoAttack over the eval
    images in chunks, every model on the same chunk, for as many chunks as the budget leaves (at
    least one): all arms are always scored on the same images. A report is written after every
    model and every chunk, so a run stopped from outside still leaves its results."""
    # what the evaluation needs, checked before minutes of training (a GPU run once lost its
    # evaluation to a missing torchattacks after all eight models had trained)
    import scipy.stats  # noqa: F401  (McNemar)
    import torchattacks  # noqa: F401

    run = Run(args)
    lam = _chosen_lam(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; known: {', '.join(ARMS)}")
    per_step, scaled = (calibration_from(run, args, args.calibration_from, arms, lam) if args.calibration_from
                        else (calibrate(run, lam, args.calibration_steps), {}))
    budget = args.budget_minutes * 60
    train_budget = budget * (1 - args.eval_share) - run.elapsed()
    seconds = args.arm_seconds or max(1.0, train_budget / (len(arms) * len(seeds)))
    stem = args.out or RESULTS / "training.mimir_compare"
    state = {"lam": lam, "seeds": seeds, "arms": arms, "per_step": per_step, "scaled": scaled, "seconds": seconds,
             "records": [], "outcomes": {}, "chunk_seconds": []}
    models = {}
    for seed in seeds:
        for arm in arms:
            clf, record = train_arm(run, arm, seed, lam, seconds, per_step)
            models[(arm, seed)] = clf
            state["records"].append(record)
            print(json.dumps({k: record[k] for k in ("arm", "seed", "planned_seconds", "train_seconds")}), flush=True)
            _write_compare(run, args, stem, state, final=False)
    # AutoAttack, chunk by chunk over the same images for every model
    outcomes = {key: ([], []) for key in models}  # (clean, robust) per chunk
    n_done = 0
    while n_done < len(run.test_x):
        t0 = time.perf_counter()
        lo, hi = n_done, min(n_done + args.eval_batch, len(run.test_x))
        for key, clf in models.items():
            c, r, _ = autoattack_outcomes(run, clf, lo, hi)
            outcomes[key][0].append(c)
            outcomes[key][1].append(r)
            state["outcomes"][key] = (np.concatenate(outcomes[key][0]), np.concatenate(outcomes[key][1]))
            _write_compare(run, args, stem, state, final=False)  # scored on the images all models share
        n_done = hi
        state["chunk_seconds"].append(round(time.perf_counter() - t0, 1))
        print(json.dumps({"eval_images": n_done, "chunk_seconds": state["chunk_seconds"][-1],
                          "elapsed": round(run.elapsed(), 1)}), flush=True)
        if run.elapsed() + max(state["chunk_seconds"]) > budget:
            break
    _write_compare(run, args, stem, state, final=True)
    return 0


def _scored(arms: list[str], seeds: list[int], records: list[dict], scored_outcomes: dict) -> dict:
    """The report's figures from per-image outcomes ``{(arm, seed): (clean [n], robust [n]) bool}``
    (all on the same first ``n`` test images): summary per arm, paired tests, the target's verdict."""
    n_eval = min((len(c) for c, _ in scored_outcomes.values()), default=0)
    scored = {key: (c[:n_eval], r[:n_eval]) for key, (c, r) in scored_outcomes.items()}
    outcomes = {arm: [scored[(arm, s)][1] for s in seeds if (arm, s) in scored] for arm in arms}
    clean_out = {arm: [scored[(arm, s)][0] for s in seeds if (arm, s) in scored] for arm in arms}
    summary = {}
    for arm in arms:
        rob = [float(o.mean()) for o in outcomes[arm]]
        summary[arm] = {"label": ARMS[arm], "robust_per_seed": rob, "robust_mean": float(np.mean(rob)) if rob else None,
                        "clean_per_seed": [float(o.mean()) for o in clean_out[arm]],
                        "train_seconds_per_seed": [r["train_seconds"] for r in records if r["arm"] == arm],
                        "steps_per_seed": [[r.get("pretrain", {}).get("steps", 0), r["finetune"]["steps"]]
                                           for r in records if r["arm"] == arm]}
    by_seed = {arm: {s: scored[(arm, s)][1] for s in seeds if (arm, s) in scored} for arm in arms}
    pairs = compare_pairs(by_seed) if n_eval else []
    target = next((p for p in pairs if (p["first"], p["second"]) == ("mimir", "scratch")), None)
    verdict = None
    if target:
        lo, hi = target["bootstrap_seed_averaged"]["ci95"]
        verdict = ("met: the 95% CI of MIMIR - scratch lies above +3 points" if lo > 0.03 else
                   "not met, with 95% confidence: the CI of MIMIR - scratch lies below +3 points" if hi < 0.03 else
                   "undecided: the 95% CI of MIMIR - scratch contains +3 points")
        verdict += f" (seeds {', '.join(map(str, target['seeds']))})"
    bits = {f"{arm}:{seed}": {"clean": "".join("1" if v else "0" for v in c),
                              "robust": "".join("1" if v else "0" for v in r)} for (arm, seed), (c, r) in scored.items()}
    return {"n_eval": n_eval, "eval_images": f"test[:{n_eval}]", "summary": summary, "paired": pairs,
            "target_mimir_plus_3_over_scratch": verdict, "outcomes": bits}


def _write_compare(run: Run, args: argparse.Namespace, stem: Path, state: dict, final: bool) -> None:
    lam, seeds, arms, records = state["lam"], state["seeds"], state["arms"], state["records"]
    # while running, models may have been attacked on different numbers of images: keep the common prefix
    figures = _scored(arms, seeds, records, state["outcomes"])
    report = {
        "what": "MIMIR vs adversarial MAE vs MAE + PGD-AT vs PGD-AT from scratch at equal wall-clock training time",
        "complete": final, "command": "python bench/training/mimir_compare.py " + " ".join(args.argv),
        "started_utc": run.started_utc,
        "equal_compute": ("wall clock: each arm and seed trains for the same planned seconds, from per-step times "
                          + (f"measured by the part {args.calibration_from} (--calibration-from)"
                             if args.calibration_from else "measured in this process (calibration)")
                          + "".join(f"; {k}: the part's {v['relative_to']} time x {v['ratio_measured_here']:.3f}, the "
                                    f"ratio of the two measured in this process (the part did not measure {k})"
                                    for k, v in state["scaled"].items())
                          + "; realized seconds in train_seconds_per_seed"),
        "lam": lam, "lam_source": "sweep" if args.lam is None else "--lam", "sigma": args.sigma or "median",
        "estimator": args.estimator,
        "attack": ("AutoAttack standard (torchattacks: APGD-CE, APGD-T, FAB-T, Square), linf eps 0.1"
                   if args.attack == "autoattack" else "APGD-CE only (smoke test, not AutoAttack)"),
        "n_eval_asked": len(run.test_x), "eval_chunk_seconds": state["chunk_seconds"], "seeds": seeds,
        "arms": arms, "arch": run.arch,
        "ft_pgd_steps": args.ft_pgd_steps, "seconds_per_step": state["per_step"],
        "mimir_over_mae_seconds_per_step": state["per_step"]["mimir"] / state["per_step"]["mae"],
        **({"carry_over_mae_seconds_per_step": state["per_step"]["mimir-carry"] / state["per_step"]["mae"]}
           if "mimir-carry" in state["per_step"] else {}),
        "planned_train_seconds_per_arm": round(state["seconds"], 2), "train_items": len(run.train_x),
        "batch_size": args.batch_size, "pretrain_share": args.pretrain_share, **figures, "runs": records,
        "total_seconds": round(run.elapsed(), 1), "budget_seconds": args.budget_minutes * 60,
        "machine": machine(run.device),
    }
    if final:
        report["plot"] = _compare_plot(report, stem)
    md = _compare_md(report)
    json_path, md_path = _paths(stem)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(md)
    if final:
        print(md)


MUST_AGREE = ("lam", "estimator", "sigma", "attack", "arch", "ft_pgd_steps", "batch_size", "pretrain_share",
              "planned_train_seconds_per_arm", "train_items")


CALIBRATION_MUST_AGREE = ("arch", "batch_size", "ft_pgd_steps", "estimator")


def calibration_from(run: Run, args: argparse.Namespace, path: Path, arms: list[str],
                     lam: float) -> tuple[dict[str, float], dict[str, dict]]:
    """The per-step times of an earlier ``compare`` part (its ``seconds_per_step``) instead of this
    process's calibration: every part of one comparison then gives each arm the same steps, which a
    fresh calibration on a shared CPU does not (two parts here measured the PGD-3 step 10% apart).
    Refused unless the part ran the same architecture, batch, PGD steps and estimator on the same
    kind of machine with as many threads. A kind of step ``arms`` need that the part did not measure
    (an arm added later) is the part's clean-MAE time times the ratio of the two measured here.
    -> (seconds per step by kind, {kind: how it was scaled})."""
    try:
        part = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--calibration-from: cannot read {path}: {exc}") from None
    if not isinstance(part, dict) or "seconds_per_step" not in part or "machine" not in part:
        raise SystemExit(f"--calibration-from: {path} is not a compare result (no seconds_per_step / machine)")
    mine = {"arch": run.arch, "batch_size": args.batch_size, "ft_pgd_steps": args.ft_pgd_steps,
            "estimator": args.estimator}
    for key in CALIBRATION_MUST_AGREE:
        if part.get(key) != mine[key]:
            raise SystemExit(f"--calibration-from: {path} ran {key} {part.get(key)!r}, this run {mine[key]!r}")
    here = machine(run.device)
    for key in ("cpu", "cores", "device", "gpu", "torch_threads"):
        if part["machine"].get(key) != here.get(key):
            raise SystemExit(f"--calibration-from: {path} ran on {key} {part['machine'].get(key)!r}, this machine "
                             f"has {here.get(key)!r}")
    per_step = {k: float(v) for k, v in part["seconds_per_step"].items()}
    missing = sorted({PRE_KIND[a] for a in arms if a in PRE_KIND} - set(per_step))
    if not missing:
        return per_step, {}
    here = calibrate(run, lam, args.calibration_steps)
    scaled = {k: {"relative_to": "mae", "ratio_measured_here": here[k] / here["mae"]} for k in missing}
    for k in missing:
        per_step[k] = per_step["mae"] * scaled[k]["ratio_measured_here"]
    return per_step, scaled


def merge(args: argparse.Namespace) -> int:
    """One comparison from several ``compare`` runs that each trained some of the arms and seeds
    (``--arms``, ``--seeds``) with the same settings and the same ``--arm-seconds``: e.g. one GPU
    session per pair of models, when no single session holds all eight. Refuses parts whose
    settings differ (:data:`MUST_AGREE`), an (arm, seed) trained twice, or a part written while
    running; scores every model on the test images all parts attacked (their common prefix)."""
    if not args.parts:
        raise SystemExit("merge: give the compare results to merge with --parts A.json B.json ...")
    parts = [json.loads(Path(path).read_text()) for path in args.parts]
    first = parts[0]
    for path, part in zip(args.parts, parts):
        if "outcomes" not in part:
            raise SystemExit(f"merge: {path} has no per-image outcomes (written before merge existed): rerun it")
        if not part.get("complete"):
            raise SystemExit(f"merge: {path} was written while running (complete: false)")
        for key in MUST_AGREE:
            if part.get(key) != first.get(key):
                raise SystemExit(f"merge: {path} differs from {args.parts[0]} in {key}: "
                                 f"{part.get(key)!r} vs {first.get(key)!r}")
    scored, records, seen = {}, [], {}
    for path, part in zip(args.parts, parts):
        for key, bits in part["outcomes"].items():
            if key in seen:
                raise SystemExit(f"merge: {key} is in both {seen[key]} and {path}")
            seen[key] = path
            arm, seed = key.rsplit(":", 1)
            scored[(arm, int(seed))] = (np.array([c == "1" for c in bits["clean"]]),
                                        np.array([c == "1" for c in bits["robust"]]))
        records += part["runs"]
    arms = [a for a in ARMS if any(k[0] == a for k in scored)]
    seeds = sorted({k[1] for k in scored})
    records.sort(key=lambda r: (r["seed"], list(ARMS).index(r["arm"])))
    report = {key: value for key, value in first.items() if key not in ("outcomes", "paired", "summary")}
    report.update(_scored(arms, seeds, records, scored))
    # one calibration for all parts (--calibration-from), or each its own: the realized steps differ then
    kinds = set.intersection(*(set(p["seconds_per_step"]) for p in parts))
    spread = max(max(p["seconds_per_step"][k] for p in parts) / min(p["seconds_per_step"][k] for p in parts) - 1
                 for k in kinds)
    # a kind of step the first part did not measure (an arm added later): the first part that has it
    per_step, later = dict(first["seconds_per_step"]), {}
    for path, part in zip(args.parts, parts):
        for k, v in part["seconds_per_step"].items():
            if k not in per_step:
                per_step[k], later[k] = v, str(path)
    report["equal_compute"] = (
        "wall clock: each arm and seed trains for the same planned seconds, at per-step times "
        + (f"that are the same in every part (the first part's calibration, {args.parts[0]}; the others took it with "
           "--calibration-from)" if spread == 0 else
           f"that each part measured itself (they differ by up to {100 * spread:.0f}% between parts: the steps per "
           "model in the table are what each trained)")
        + "".join(f"; {k}: {path}'s time (the first part did not measure it; that part's equal_compute says how "
                  "it was set)" for k, path in later.items())
        + "; realized seconds in train_seconds_per_seed")
    if "mimir-carry" in per_step:
        report["carry_over_mae_seconds_per_step"] = per_step["mimir-carry"] / per_step["mae"]
    report.update(
        command="python bench/training/mimir_compare.py " + " ".join(args.argv or []), complete=True, arms=arms,
        seconds_per_step=per_step,
        seeds=seeds, runs=records, n_eval_asked=min(p["n_eval_asked"] for p in parts),
        total_seconds=round(sum(p["total_seconds"] for p in parts), 1),
        budget_seconds=sum(p["budget_seconds"] for p in parts),
        parts=[{"path": str(path), "command": p["command"], "started_utc": p["started_utc"], "arms": p.get("arms"),
                "seeds": p["seeds"], "n_eval": p["n_eval"], "seconds_per_step": p["seconds_per_step"],
                "machine": p["machine"]} for path, p in zip(args.parts, parts)],
    )
    stem = args.out or RESULTS / "training.mimir_compare"
    report["plot"] = _compare_plot(report, stem)
    _write(stem, report, _compare_md(report))
    return 0


def cost(args: argparse.Namespace) -> int:
    """MIMIR vs clean MAE seconds per pre-training epoch, epochs alternating on the same images
    (``python -m robustgate.models.mimir --compare``), for each ``--patch-sizes``; the PGD step's share."""
    from robustgate.models import mimir

    dev = torch.device(args.device)
    preset = {**PRESETS["cuda" if dev.type == "cuda" else "cpu"],
              **{k: getattr(args, k) for k in ("dim", "depth", "heads") if getattr(args, k) is not None}}
    rows, t0, started = {}, time.perf_counter(), _started()
    with tempfile.TemporaryDirectory() as tmp:
        for patch in (int(v) for v in args.patch_sizes.split(",")):
            argv = ["--compare", str(args.repeats), "--n", str(args.cost_images), "--batch-size", str(args.batch_size),
                    "--dim", str(preset["dim"]), "--depth", str(preset["depth"]), "--heads", str(preset["heads"]),
                    "--patch-size", str(patch), "--lam", "1e-3", "--device", args.device,
                    "--threads", str(args.threads or 0), "--json", f"{tmp}/p{patch}.json"]
            if args.data_dir:
                raise SystemExit("cost reads Debian's Fashion-MNIST (python -m robustgate.models.mimir has no --data-dir)")
            mimir.main(argv)
            rows[patch] = {"argv": "python -m robustgate.models.mimir " + " ".join(argv[:-2]),
                           **json.loads(Path(f"{tmp}/p{patch}.json").read_text())}
            if time.perf_counter() - t0 > args.budget_minutes * 60:
                break
    report = {"what": "pre-training seconds per epoch, MIMIR (1 PGD step + nHSIC, median sigma), and MIMIR with deltas "
                      "carried across epochs, vs clean MAE, epochs alternating on the same images (paper Table 10; "
                      "target <= 1.3x)",
              "command": "python bench/training/mimir_compare.py " + " ".join(args.argv),
              "started_utc": started, "by_patch_size": rows, "machine": machine(dev)}
    lines = ["# MIMIR vs MAE: pre-training time per epoch\n", f"`{report['command']}`\n",
             f"Machine: {args.device}, {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
             f"{torch.__version__}, revision {report['machine']['robustgate_revision']}, load average at end "
             f"{report['machine']['load_average_at_end']}. Encoder {preset['dim']}-d x {preset['depth']} blocks, decoder "
             "sized to it, norm_pix_loss, nHSIC with median-heuristic sigma, lambda 1e-3; epochs of MAE, MIMIR and MIMIR "
             f"with carried deltas alternate {args.repeats} times on the same {args.cost_images} images, batch "
             f"{args.batch_size}.\n",
             "| patch | MAE CPU s / epoch | MIMIR CPU s / epoch | **MIMIR / MAE (CPU)** | (wall) | PGD share of MIMIR's "
             "epoch | MIMIR, carried deltas, CPU s / epoch | **carried / MAE (CPU)** | (wall) | delta updates' share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for patch, r in rows.items():
        c = r["median_cpu_seconds_per_epoch"]
        lines.append(f"| {patch} | {c['mae-pretrain']:.2f} | {c['mimir-pretrain']:.2f} | **{r['mimir_over_mae_cpu']:.2f}x** "
                     f"| {r['mimir_over_mae_wall']:.2f}x | {100 * r['mimir_pgd_share_of_epoch']:.0f}% "
                     f"| {c[mimir.CARRY]:.2f} | **{r['carry_over_mae_cpu']:.2f}x** | {r['carry_over_mae_wall']:.2f}x "
                     f"| {100 * r['carry_update_share_of_epoch']:.0f}% |")
    lines.append("\nTarget <= 1.3x MAE per epoch: MIMIR as the reference runs it (one PGD step per batch) misses it on a "
                 "CPU (docs/MIMIR.md says why); carried deltas (models/mimir.py, `perturbation=\"carry\"`) take the PGD "
                 "step's extra forward and backward pass out.\n")
    _write(args.out or RESULTS / "training.mimir_compare.cost", report, "\n".join(lines))
    return 0


def mi_check(args: argparse.Namespace) -> int:
    """Does the MI estimate depend on the data? Each estimator and width on (x + delta, z) of real
    batches against the same with z permuted across the batch (independent by construction)."""
    from robustgate.models.hsic import ESTIMATORS

    run = Run(args)
    mae = run.mae(args.seed).eval()
    rows: dict[str, dict] = {}
    for b in range(args.batches):
        x = run.train_x[b * args.batch_size:(b + 1) * args.batch_size]
        gen = torch.Generator().manual_seed(b)
        x_adv = (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * EPS).clamp(0, 1)
        with torch.no_grad():
            z = mae.forward_encoder(x_adv, mae.sample_masking(len(x), generator=gen)).flatten(1)  # [n, (1+K) dim]
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for name, fn in ESTIMATORS.items():
            for sigma in (5.0, None):
                key = f"{name}, sigma {sigma:g}" if sigma else f"{name}, sigma median"
                r = rows.setdefault(key, {"paired": [], "z_permuted": []})
                r["paired"].append(fn(x_adv.flatten(1), z, sigma_x=sigma, sigma_y=sigma).item())
                r["z_permuted"].append(fn(x_adv.flatten(1), z[perm], sigma_x=sigma, sigma_y=sigma).item())
    for r in rows.values():
        r["paired_mean"], r["permuted_mean"] = float(np.mean(r["paired"])), float(np.mean(r["z_permuted"]))
        r["ratio"] = r["paired_mean"] / r["permuted_mean"] if r["permuted_mean"] else None
    report = {"what": "MI estimators on (x + delta, latent) of an initialized MAE encoder: paired vs latent permuted "
                      "(a useful estimate is clearly larger when paired)",
              "command": "python bench/training/mimir_compare.py " + " ".join(args.argv), "started_utc": run.started_utc,
              "batch_size": args.batch_size, "batches": args.batches, "arch": run.arch, "rows": rows,
              "machine": machine(run.device)}
    lines = ["# MIMIR: does the MI estimate depend on the data?\n", f"`{report['command']}`\n",
             f"{args.batches} batches of {args.batch_size} Fashion-MNIST training images + uniform noise of eps {EPS}; z = "
             f"the latent of an initialized {run.arch['dim']}-d x {run.arch['depth']} MAE encoder. Permuting z across "
             "the batch makes the pair independent: an estimate that does not drop then measures nothing.\n",
             "| estimator, kernel width | paired (mean) | z permuted (mean) | paired / permuted |", "| --- | --- | --- | --- |"]
    for key, r in rows.items():
        ratio = f"{r['ratio']:.4f}" if r["ratio"] else "n/a"
        lines.append(f"| {key} | {r['paired_mean']:.6g} | {r['permuted_mean']:.6g} | {ratio} |")
    _write(args.out or RESULTS / "training.mimir_compare.mi_check", report, "\n".join(lines) + "\n")
    return 0


def _chosen_lam(args: argparse.Namespace) -> float:
    if args.lam is not None:
        return args.lam
    path = RESULTS / "training.mimir_compare.sweep.json"
    if not path.is_file():
        raise SystemExit(f"--lam not given and no sweep result at {path}: run the sweep phase first")
    sweep_report = json.loads(path.read_text())
    if sweep_report.get("estimator", "nhsic_cca") != args.estimator:
        raise SystemExit(f"the sweep in {path} calibrated lambda for {sweep_report.get('estimator', 'nhsic_cca')}, "
                         f"not --estimator {args.estimator}: give --lam")
    # lambda 0 is the adv-mae arm already: the MIMIR arm takes the best nonzero lambda of the sweep
    return float(sweep_report["chosen_lam"] or sweep_report["chosen_nonzero_lam"])


# ---- reports -----------------------------------------------------------------------------------------
def _paths(stem: Path) -> tuple[Path, Path]:
    """``<stem>.json``, ``<stem>.md`` (appended: ``with_suffix`` would eat ``.mimir_compare``)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"


def _write(stem: Path, report: dict, md: str) -> None:
    json_path, md_path = _paths(stem)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(md)
    print(md)


def _compare_plot(r: dict, stem: Path) -> str | None:
    """``<stem>.png``: each arm's AutoAttack accuracy per seed and its mean, and every paired
    difference with its bootstrap 95% CI beside 0 and the target's +3 points -> the file's name
    (None when nothing was scored)."""
    arms = [a for a, s in r["summary"].items() if s["robust_per_seed"]]
    if not arms:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(arms), len(r["paired"])) + 1.8))
    for y, arm in enumerate(arms):
        s = r["summary"][arm]
        left.scatter([100 * v for v in s["robust_per_seed"]], [y] * len(s["robust_per_seed"]), color="C0", s=18,
                     label="a seed" if y == 0 else None)
        left.scatter([100 * s["robust_mean"]], [y], marker="|", color="k", s=300, label="mean" if y == 0 else None)
    left.set_yticks(range(len(arms)), arms)
    left.invert_yaxis()
    left.set_xlabel(f"AutoAttack robust accuracy (%), {r['eval_images']}")
    left.legend(loc="upper right", fontsize=8)
    for y, p in enumerate(r["paired"]):
        b = p["bootstrap_seed_averaged"]
        lo, hi = 100 * b["ci95"][0], 100 * b["ci95"][1]
        right.errorbar([100 * b["difference"]], [y], xerr=[[100 * b["difference"] - lo], [hi - 100 * b["difference"]]],
                       fmt="o", color="C3" if (p["first"], p["second"]) == ("mimir", "scratch") else "C0", capsize=3)
    right.axvline(0, color="k", lw=0.8)
    right.axvline(3, color="C3", ls="--", lw=0.8, label="target: MIMIR - scratch >= +3")
    right.set_yticks(range(len(r["paired"])), [f"{p['first']} - {p['second']}" for p in r["paired"]])
    right.invert_yaxis()
    right.set_xlabel("paired difference (points), bootstrap 95% CI, seed-averaged")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"MIMIR comparison: {r['planned_train_seconds_per_arm']:.0f} s of training per arm and seed, "
                 f"seeds {', '.join(map(str, r['seeds']))}", fontsize=10)
    fig.tight_layout()
    path = Path(stem).parent / f"{Path(stem).name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _sweep_md(r: dict) -> str:
    lines = [f"# MIMIR lambda sweep\n", f"`{r['command']}`\n",
             f"Machine: {r['machine']['device']}, {r['machine']['platform']}, torch {r['machine']['torch']}, "
             f"{r['machine']['torch_threads']} threads, load average at end {r['machine']['load_average_at_end']}.",
             f"Encoder {r['arch']['dim']}-d x {r['arch']['depth']} blocks, patch {r['arch']['patch_size']}; "
             f"{r['train_items']} training images, batch {r['batch_size']}; sigma {r['sigma']}; "
             f"{r['seconds_per_arm']} s of training per lambda (half pre-training, half PGD-{r['ft_pgd_steps']} AT "
             "fine-tuning).\n",
             "| lambda | pre-train steps | MI share of the loss per epoch (%) | rec loss (last epoch) | fine-tune steps "
             "| val clean | **val PGD-10** |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        p = row["pretrain"]
        share = ", ".join(f"{100 * s:.2f}" for s in p["mi_share_per_epoch"])
        lines.append(f"| {row['lam']:g} | {p['steps']} | {share} | {p['rec_loss_per_epoch'][-1]:.4f} | "
                     f"{row['finetune']['steps']} | {_pct(row['val_clean'])} | **{_pct(row['val_pgd10'])}** |")
    n = int(r["selected_by"].split(" on ")[1].split()[0])
    half = 1.96 * math.sqrt(0.25 / n) * 100
    lines += ["", f"Chosen lambda: **{r['chosen_lam']:g}**; best nonzero: {r['chosen_nonzero_lam']} ({r['selected_by']}; at n = {n} a single accuracy "
              f"carries up to +-{half:.1f} points of binomial 95% error, so neighbouring lambdas are not "
              "distinguished by this sweep alone).", f"Total {r['total_seconds']} s of a {r['budget_seconds']} s budget.\n"]
    return "\n".join(lines)


def _compare_md(r: dict) -> str:
    lines = [f"# MIMIR comparison at equal compute\n", f"`{r['command']}`\n",
             f"Machine: {r['machine']['device']} ({r['machine'].get('gpu', r['machine']['platform'])}), "
             f"torch {r['machine']['torch']}. Encoder {r['arch']['dim']}-d x {r['arch']['depth']} blocks, patch "
             f"{r['arch']['patch_size']}; lambda {r['lam']:g} ({r['lam_source']}), sigma {r['sigma']}. "
             f"{r['equal_compute']}: {r['planned_train_seconds_per_arm']} s per arm and seed "
             f"(pre-training share {r['pretrain_share']}, fine-tuning PGD-{r['ft_pgd_steps']}). Attack: {r['attack']} "
             f"on {r['eval_images']} ({r['n_eval_asked']} asked; chunks stop at the budget), seeds {r['seeds']}."
             + ("" if r["complete"] else " **Incomplete: written while running.**") + "\n",
             "| arm | robust per seed (%) | **robust mean** | clean per seed | training s per seed | steps per seed "
             "(pre-training + fine-tuning) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in r["summary"].values():
        mean = _pct(s["robust_mean"]) if s["robust_mean"] is not None else "n/a"
        lines.append(f"| {s['label']} | {', '.join(_pct(v) for v in s['robust_per_seed'])} | "
                     f"**{mean}** | {', '.join(_pct(v) for v in s['clean_per_seed'])} | "
                     f"{', '.join(f'{v:.0f}' for v in s['train_seconds_per_seed'])} | "
                     f"{', '.join(f'{a} + {b}' for a, b in s.get('steps_per_seed', []))} |")
    lines += ["", "Paired tests (per-image robust outcomes on the same images):", "",
              "| first - second | seeds | difference (seed-averaged) | bootstrap 95% CI | McNemar p per seed | pooled p |",
              "| --- | --- | --- | --- | --- | --- |"]
    for p in r["paired"]:
        b = p["bootstrap_seed_averaged"]
        lines.append(f"| {p['first']} - {p['second']} | {', '.join(map(str, p.get('seeds', r['seeds'])))} | "
                     f"{100 * b['difference']:+.1f} | "
                     f"[{100 * b['ci95'][0]:+.1f}, {100 * b['ci95'][1]:+.1f}] | "
                     f"{', '.join(format(m['p_value'], '.3g') for m in p['mcnemar_per_seed'])} | "
                     f"{p['mcnemar_pooled_seeds']['p_value']:.3g} |")
    ps = r["seconds_per_step"]
    carry = (f"; MIMIR with carried deltas {ps['mimir-carry']:.4f} s = "
             f"**{r['carry_over_mae_seconds_per_step']:.2f}x**" if "carry_over_mae_seconds_per_step" in r else "")
    lines += ["", f"Pre-training cost per batch (calibration, median): MIMIR {ps['mimir']:.4f} s, adversarial MAE "
              f"{ps['adv-mae']:.4f} s, clean MAE {ps['mae']:.4f} s: MIMIR / MAE = "
              f"**{r['mimir_over_mae_seconds_per_step']:.2f}x** (target <= 1.3x){carry}; PGD-{r['ft_pgd_steps']} AT "
              f"step {ps['pgd-at']:.4f} s."]
    if r.get("plot"):
        lines += ["", f"Plot: [{r['plot']}]({r['plot']})."]
    lines += ["", f"Target (MIMIR >= +3 points over scratch): {r['target_mimir_plus_3_over_scratch']}.",
              f"Total {r['total_seconds']} s of a {r['budget_seconds']} s budget.\n"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    revision()  # the commit this run starts from (machine())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["cost", "mi-check", "sweep", "compare", "merge"])
    p.add_argument("--parts", nargs="+", type=Path, help="merge: the compare results (JSON) to merge")
    p.add_argument("--arm-seconds", type=float,
                   help="compare: planned training seconds per arm and seed (default: the budget's share); give the "
                        "same value to every run of one comparison split over sessions, then merge them")
    p.add_argument("--budget-minutes", type=float,
                   help="wall-clock minutes for the whole phase (training, evaluation); every arm is scaled to fit")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST .gz files (default: Debian's)")
    p.add_argument("--lams", default=",".join(f"{v:g}" for v in LAMS), help="sweep: lambdas (default 0,1e-5,...,1e-2)")
    p.add_argument("--lam", type=float, help="compare: MIMIR's lambda (default: the sweep's choice)")
    p.add_argument("--sigma", type=lambda t: None if t == "median" else float(t), default=None,
                   help="HSIC kernel width or 'median' (default: median heuristic)")
    p.add_argument("--estimator", choices=["nhsic_cca", "hsic"], default=PAPER_DEFAULTS["estimator"],
                   help="MI estimator (default nhsic_cca, the reference's; see the mi-check phase)")
    p.add_argument("--batches", type=int, default=5, help="mi-check: batches (default 5)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"compare: arms of {', '.join(ARMS)} (default the four of the issue: {', '.join(DEFAULT_ARMS)})")
    p.add_argument("--seeds", default="0,1", help="compare: seeds (default 0,1)")
    p.add_argument("--seed", type=int, default=0, help="sweep: seed")
    p.add_argument("--n-eval", type=int, default=1000, help="compare: AutoAttack test images (default 1000)")
    p.add_argument("--n-val", type=int, default=500, help="validation images for the sweep's PGD-10 (default 500)")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="compare: AutoAttack chunk; chunks run until the budget is spent (default 250 on the CPU, "
                        "1000 on CUDA, where Square's 5,000 sequential queries make small chunks slow)")
    p.add_argument("--attack", choices=["autoattack", "apgd-ce"], default="autoattack",
                   help="compare: autoattack (default) or apgd-ce (smoke tests only)")
    p.add_argument("--eval-share", type=float, default=0.45,
                   help="compare: budget share kept for AutoAttack (default 0.45); evaluation stops at the budget "
                        "after the first chunk")
    p.add_argument("--pretrain-share", type=float, default=0.5, help="pre-trained arms: share spent pre-training")
    p.add_argument("--train-items", type=int, help="training images (default: all 55,000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 128 on the CPU; 512 on CUDA (the reference's fine-tuning batch, 128 x 4 GPUs); "
                        "learning rates scale as blr * batch / 256")
    p.add_argument("--pretrain-blr", type=float, default=PAPER_DEFAULTS["blr"], help="lr = blr * batch / 256")
    p.add_argument("--finetune-blr", type=float, default=REFERENCE["blr"], help="lr = blr * batch / 256")
    p.add_argument("--dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--patch-size", type=int, help="4 (7x7 grid) or 2 (14x14) on 28x28")
    p.add_argument("--ft-pgd-steps", type=int, default=REFERENCE["steps"],
                   help="PGD steps of the fine-tuning attack (default 10, the reference's)")
    p.add_argument("--patch-sizes", default="4,2", help="cost: patch sizes timed (default 4,2)")
    p.add_argument("--repeats", type=int, default=3, help="cost: alternations of MAE and MIMIR epochs (default 3)")
    p.add_argument("--cost-images", type=int, default=1024, help="cost: images per epoch (default 1024)")
    p.add_argument("--calibration-steps", type=int, default=3)
    p.add_argument("--calibration-from", type=Path,
                   help="compare: take the per-step times of an earlier compare part (its JSON) instead of measuring "
                        "them, so that every part of one comparison gives each arm the same steps")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path,
                   help="output stem (default bench/results/training.mimir_compare[.cost|.sweep])")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.argv = argv
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (512 if cuda else 128)
    args.eval_batch = args.eval_batch or (1000 if cuda else 250)
    if args.phase != "merge" and args.budget_minutes is None:
        p.error(f"{args.phase} needs --budget-minutes")
    return {"cost": cost, "mi-check": mi_check, "sweep": sweep, "compare": compare, "merge": merge}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
