"""MIMIR vs MAE vs from-scratch PGD-AT at equal compute on Fashion-MNIST (eps 0.1, l-inf).

    .venv/bin/python bench/training/mimir_compare.py size                 # per-batch CPU cost -> epoch plan
    .venv/bin/python bench/training/mimir_compare.py train [--work DIR]   # the three arms (background-friendly)
    .venv/bin/python bench/training/mimir_compare.py eval  [--work DIR]   # robustgate eval of each bundle
    .venv/bin/python bench/training/mimir_compare.py table [--work DIR]   # the comparison table (markdown)

The arms (docs/MIMIR.md, "Comparison at equal compute"), all on the same reduced ViT
(``vit_tiny`` with ``ARCH``), the same ``TRAIN_ITEMS`` training images and the same PGD-AT
fine-tuning recipe (``FINETUNE``):

  a-scratch  PGD-AT from a random initialization for ``EPOCHS["a-scratch"]`` epochs;
  b-mae      clean MAE pre-training (``robustgate train --method mae-pretrain``), then PGD-AT
             fine-tuning from the encoder (``--init``);
  c-mimir    MIMIR pre-training (``--method mimir-pretrain``: 1 PGD step of 1.25 eps on the
             reconstruction, HSIC penalty lambda 1e-5), then the same fine-tuning.

Equal compute = equal single-thread CPU seconds spent in training steps. ``size`` measures the CPU
cost of one batch of each kind of step in one process, interleaved (so all see the same machine
load), and prints the planned training CPU of each arm for the epochs in ``EPOCHS``; the epochs
were chosen from that measurement so the three totals match within a few percent. ``train`` then
records each job's real CPU time (user + sys from ``os.wait4``; it also includes data loading,
the per-epoch validation PGD and the final test PGD, which the plan leaves out).

Every job runs as ``nice -n 5`` with one torch thread, at most ``--parallel`` (2) at a time, each
logging to ``<work>/logs/<job>.log``. The machine is shared: wall times are not comparable, CPU
times are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")

ARCH = {"dim": 64, "depth": 4, "heads": 4, "patch_size": 4}  # ViT-tiny is dim 192, depth 12: hours/epoch here
TRAIN_ITEMS = 10_000
BATCH = 128
EPS = 0.1
FINETUNE = ["--method", "pgd-at", "--eps", str(EPS), "--steps", "5", "--optimizer", "adam", "--lr", "1e-3",
            "--weight-decay", "0", "--schedule", "onecycle", "--val-items", "300", "--val-steps", "10",
            "--test-items", "500", "--test-steps", "20"]
PRETRAIN = ["--eps", str(EPS), "--alpha", str(1.25 * EPS), "--lr", "1e-3", "--mi-lambda", "1e-5", "--mi-sigma", "5",
            "--mi-estimator", "nhsic_cca"]
# ~1,040 training CPU-seconds per arm (`size`: per-batch costs 1.34 / 0.37 / 0.67 s for PGD-AT / MAE / MIMIR)
EPOCHS = {"a-scratch": 10, "b-mae-pre": 14, "b-mae": 6, "c-mimir-pre": 8, "c-mimir": 6}
ARMS = {"a-scratch": "PGD-AT from scratch", "b-mae": "MAE pre-training + PGD-AT",
        "c-mimir": "MIMIR pre-training + PGD-AT"}
EVAL_N, EVAL_N_AA = 500, 200


def _common(job: str) -> list[str]:
    return ["--dataset", "fashion-mnist", "--arch", "vit_tiny", "--arch-kwargs", json.dumps(ARCH),
            "--train-items", str(TRAIN_ITEMS), "--batch-size", str(BATCH), "--epochs", str(EPOCHS[job]),
            "--threads", "1", "--seed", "0", "--no-progress"]


def jobs(work: Path) -> dict[str, tuple[list[str], list[str]]]:
    """job -> (robustgate train arguments, jobs it waits for)."""
    def finetune(job: str, init: str | None) -> list[str]:
        extra = ["--init", str(work / init / "pretrained.safetensors")] if init else []
        return ["train", *_common(job), *FINETUNE, *extra, "--name", f"mimir-{job}",
                "--checkpoint-dir", str(work / f"{job}.ckpt"), "--out", str(work / job)]

    return {
        "a-scratch": (finetune("a-scratch", None), []),
        "c-mimir-pre": (["train", *_common("c-mimir-pre"), "--method", "mimir-pretrain", *PRETRAIN,
                         "--out", str(work / "c-mimir-pre")], []),
        "b-mae-pre": (["train", *_common("b-mae-pre"), "--method", "mae-pretrain", *PRETRAIN,
                       "--out", str(work / "b-mae-pre")], []),
        "c-mimir": (finetune("c-mimir", "c-mimir-pre"), ["c-mimir-pre"]),
        "b-mae": (finetune("b-mae", "b-mae-pre"), ["b-mae-pre"]),
    }


# ---- size: the per-batch CPU cost of each kind of step --------------------------------------
def size(args: argparse.Namespace) -> int:
    import torch

    from robustgate.models.archs import build_arch
    from robustgate.models.data import load_splits
    from robustgate.models.losses import METHODS
    from robustgate.models.mae import MaskedAutoencoder
    from robustgate.models.mimir import mimir_loss, param_groups, pgd_delta

    torch.set_num_threads(1)
    s = load_splits("fashion-mnist", seed=0)
    x, y = s.train_x[:BATCH], s.train_y[:BATCH]
    torch.manual_seed(0)
    clf, mae = build_arch("vit_tiny", **ARCH), MaskedAutoencoder(**ARCH)
    opt_c = torch.optim.Adam(clf.parameters(), lr=1e-3)
    opt_m = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-3)
    cfg = types.SimpleNamespace(eps=EPS, alpha=2.5 * EPS / 5, steps=5, restarts=1, beta=6.0, noise_sigma=0.0)
    gen = torch.Generator().manual_seed(0)

    def pgd_at():
        loss, _ = METHODS["pgd-at"](clf, x, y, cfg, gen)
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()

    def pre(mimir: bool):
        masking = mae.sample_masking(BATCH, generator=gen)
        delta = pgd_delta(mae, x, masking, eps=EPS if mimir else 0.0, steps=1 if mimir else 0,
                          step_size=1.25 * EPS, generator=gen)
        loss, _, _ = mimir_loss(mae, x, delta, masking, lam=1e-5 if mimir else 0.0, sigma=5.0)
        opt_m.zero_grad()
        loss.backward()
        opt_m.step()

    steps = {"pgd-at": pgd_at, "mae-pretrain": lambda: pre(False), "mimir-pretrain": lambda: pre(True)}
    cpu = {k: [] for k in steps}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for k, f in steps.items():
            c0 = time.process_time()
            f()
            cpu[k].append(time.process_time() - c0)
    per_batch = {k: statistics.median(v[1:]) for k, v in cpu.items()}
    batches = TRAIN_ITEMS // BATCH
    plan = {
        "a-scratch": EPOCHS["a-scratch"] * batches * per_batch["pgd-at"],
        "b-mae": batches * (EPOCHS["b-mae-pre"] * per_batch["mae-pretrain"] + EPOCHS["b-mae"] * per_batch["pgd-at"]),
        "c-mimir": batches * (EPOCHS["c-mimir-pre"] * per_batch["mimir-pretrain"]
                              + EPOCHS["c-mimir"] * per_batch["pgd-at"]),
    }
    report = {"arch": ARCH, "batch": BATCH, "train_items": TRAIN_ITEMS, "epochs": EPOCHS,
              "cpu_seconds_per_batch": per_batch, "planned_training_cpu_seconds": plan,
              "load_average": os.getloadavg()}
    print(json.dumps(report, indent=1))
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        (Path(args.work) / "size.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


# ---- train: run the jobs, at most --parallel at a time ---------------------------------------
def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        return subprocess.Popen(["nice", "-n", "5", PY, "-m", "robustgate.proxy.cli", *cmd], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def run_jobs(todo: dict[str, tuple[list[str], list[str]]], work: Path, parallel: int, record: Path) -> int:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = json.loads(record.read_text()) if record.is_file() else {}
    pending = {k: v for k, v in todo.items() if done.get(k, {}).get("returncode") != 0}
    running: dict[int, tuple[str, subprocess.Popen, float]] = {}
    while pending or running:
        for name in list(pending):
            cmd, needs = pending[name]
            if len(running) < parallel and all(done.get(n, {}).get("returncode") == 0 for n in needs):
                proc = _start(cmd, work / "logs" / f"{name}.log")
                running[proc.pid] = (name, proc, time.time())
                del pending[name]
                print(f"{time.strftime('%H:%M:%S')} started {name} (pid {proc.pid})", flush=True)
        if not running:
            print(f"cannot start {sorted(pending)}: a job they need failed", file=sys.stderr)
            return 1
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, proc, t0 = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done[name] = {"returncode": proc.returncode, "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                      "wall_seconds": round(time.time() - t0, 1), "load_average_at_end": os.getloadavg(),
                      "command": "robustgate " + " ".join(todo[name][0])}
        record.write_text(json.dumps(done, indent=1) + "\n")
        print(f"{time.strftime('%H:%M:%S')} {name}: {done[name]}", flush=True)
    return 0 if all(done[k]["returncode"] == 0 for k in todo) else 1


def train(args: argparse.Namespace) -> int:
    work = Path(args.work)
    todo = jobs(work)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    return run_jobs(todo, work, args.parallel, work / "jobs.json")


# ---- eval: robustgate eval of each arm's bundle -------------------------------------------------
def evaluate(args: argparse.Namespace) -> int:
    work = Path(args.work)
    todo = {}
    for arm in ARMS:
        common = ["eval", "--bundle", str(work / arm), "--eps", str(EPS), "--steps", "20", "--threads", "1",
                  "--surface-points", "0", "--no-progress", "--seed", "0"]
        todo[f"eval-{arm}"] = ([*common, "--attacks", "pgd,pgd-mi,feature-pgd", "--n", str(args.n),
                                "--out", str(work / "eval" / arm)], [])
        todo[f"eval-{arm}-aa"] = ([*common, "--attacks", "autoattack", "--n", str(args.n_aa),
                                   "--out", str(work / "eval" / f"{arm}-autoattack")], [])
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    rc = run_jobs(todo, work, args.parallel, work / "eval_jobs.json")
    if args.copy:
        for name, (cmd, _) in todo.items():
            src = Path(cmd[cmd.index("--out") + 1])
            arm = src.name.replace("-autoattack", "")
            dst = ROOT / "docs" / "results" / f"mimir-{arm}" / ("autoattack" if src.name.endswith("autoattack") else "")
            if (src / "results.json").is_file():
                dst.mkdir(parents=True, exist_ok=True)
                for f in ("results.json", "results.md"):
                    shutil.copy(src / f, dst / f)
    return rc


# ---- table ---------------------------------------------------------------------------------------
def _accuracy(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    acc = {"clean": data["configs"]["none"]["clean"]["clean_accuracy"]}
    for c in data["cells"]:
        if c.get("status") == "done":
            acc[c["attack"]] = c["metrics"]["robust_accuracy"]
    acc["n"] = data["n"]
    return acc


def table(args: argparse.Namespace) -> int:
    work = Path(args.work)
    train_jobs = json.loads((work / "jobs.json").read_text())
    lines = ["| arm | training CPU s (pre-train + fine-tune) | clean | PGD-20 | AutoAttack | PGD-MI | feature PGD |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, label in ARMS.items():
        parts = [train_jobs[j]["cpu_seconds"] for j in (f"{arm}-pre", arm) if j in train_jobs]
        cpu = " + ".join(f"{p:.0f}" for p in parts) + (f" = {sum(parts):.0f}" if len(parts) > 1 else "")
        r = _accuracy(ROOT / "docs" / "results" / f"mimir-{arm}" / "results.json")
        aa = _accuracy(ROOT / "docs" / "results" / f"mimir-{arm}" / "autoattack" / "results.json")
        pct = lambda d, k: f"{100 * d[k]:.1f}" if k in d else "n/a"  # noqa: E731
        lines.append(f"| {label} | {cpu} | {pct(r, 'clean')} | {pct(r, 'pgd')} | {pct(aa, 'autoattack')} "
                     f"| {pct(r, 'pgd-mi')} | {pct(r, 'feature-pgd')} |")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["size", "train", "eval", "table"])
    p.add_argument("--work", default="/tmp/mimir_cmp", help="bundles, checkpoints, logs (default /tmp/mimir_cmp)")
    p.add_argument("--parallel", type=int, default=2, help="jobs at a time (default 2)")
    p.add_argument("--only", help="comma-separated job names of the phase")
    p.add_argument("--repeats", type=int, default=4, help="size: timed rounds (default 4)")
    p.add_argument("--n", type=int, default=EVAL_N, help=f"eval: test items (default {EVAL_N})")
    p.add_argument("--n-aa", type=int, default=EVAL_N_AA, help=f"eval: AutoAttack test items (default {EVAL_N_AA})")
    p.add_argument("--no-copy", dest="copy", action="store_false", help="eval: do not copy reports to docs/results")
    args = p.parse_args(argv)
    return {"size": size, "train": train, "eval": evaluate, "table": table}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
