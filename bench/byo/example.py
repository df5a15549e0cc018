"""The bring-your-own example's figures (issue 21, Benchmark, second bullet): clean accuracy, false
rejections and robust accuracy under the red team's matrix for the standard-trained classifiers
that examples/byo.sh imported and protected (Fashion-MNIST and the RGB 32x32 ImageFolder stand-in
for CIFAR-10), side by side with robustgate's own adversarially trained backbone (bundles/default)
under the same attacks, radii and number of images.

examples/byo.sh writes each run's ``WORK/eval/results.json``; this script evaluates bundles/default
with the same settings (read from the first run's results.json: attacks, eps, n, steps, queries;
configurations: the bare backbone and a MagNet detector, ``magnet_l1`` being the default bundle's)
unless ``--default-eval DIR`` already holds that evaluation, and writes
bench/results/byo.example.json + .md.

    nice -n 10 examples/byo.sh /tmp/byo-fmnist fashion-mnist
    nice -n 10 examples/byo.sh /tmp/byo-rgb rgb32
    nice -n 10 python bench/byo/example.py --run "fashion-mnist=/tmp/byo-fmnist" --run "rgb32=/tmp/byo-rgb"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("robustgate_bench_serving_run", REPO / "bench" / "serving" / "run.py")
serving = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = serving
_spec.loader.exec_module(serving)  # machine(), loadavg()

SAME = ("attacks", "eps", "n", "offset", "steps", "restarts", "queries", "seed")


def eval_default(settings: dict, out: Path, log) -> str:
    """``robustgate eval`` on bundles/default with ``settings`` (a results.json's); returns the command."""
    out.mkdir(parents=True, exist_ok=True)
    pipeline = out / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"configs": {"magnet": {"stages": [
        {"name": "magnet_l1", "kind": "magnet", "action": "reject"}]}}}))
    args = ["eval", "--bundle", str(REPO / "bundles" / "default"), "--pipeline", str(pipeline),
            "--dataset", "fashion-mnist", "--attacks", ",".join(settings["attacks"]),
            "--eps", ",".join(str(e) for e in settings["eps"]), "--n", str(settings["n"]),
            "--offset", str(settings["offset"]), "--steps", str(settings["steps"]),
            "--restarts", str(settings["restarts"]), "--queries", str(settings["queries"]),
            "--seed", str(settings["seed"]), "--no-progress", "--out", str(out / "eval")]
    log("+ robustgate " + " ".join(args))
    subprocess.run([sys.executable, "-m", "robustgate.proxy.cli", *args], check=True)
    return "robustgate " + " ".join(args)


def classes_covered(result: dict) -> dict[str, int]:
    """How many of the evaluated test items (the first n from offset) each class holds (a check that
    a run covers every class; an ImageFolder's test split is a seeded shuffle, models/data.py)."""
    from robustgate.models.bundle import Bundle
    from robustgate.models.data import load_splits

    words = result["command"].split()
    flag = lambda name: words[words.index(name) + 1] if name in words else None  # noqa: E731
    bundle = Bundle.load(result["bundle"]["path"])
    splits = load_splits(flag("--dataset") or "fashion-mnist", flag("--data-dir"), input_shape=tuple(bundle.input.shape))
    s = result["settings"]
    y = splits.test_y[s["offset"]: s["offset"] + s["n"]]
    return {splits.classes[k]: int((y == k).sum()) for k in sorted(set(y.tolist()))}


def summarize(label: str, result: dict, byo_command: str | None) -> dict:
    """One evaluated model: per configuration clean figures and robust accuracy per attack and eps."""
    s = result["settings"]
    configs = {}
    for name, info in result["configs"].items():
        cells = [c for c in result["cells"] if c["config"] == name and c["status"] == "done"]
        robust = {f"{c['attack']}@{c['eps']}": c["metrics"]["robust_accuracy"] for c in cells}
        worst = {str(e): min(c["metrics"]["robust_accuracy"] for c in cells if c["eps"] == e)
                 for e in sorted({c["eps"] for c in cells})}
        configs[name] = {"clean_accuracy": info["clean"]["clean_accuracy"],
                         "false_rejection_rate": info["clean"]["false_rejection_rate"],
                         "robust_accuracy": robust, "worst_case": worst,
                         "stages": [st["name"] for st in info["stages"]]}
    return {"label": label, "bundle": result["bundle"], "data": result["data"], "eval_command": result["command"],
            "classes_of_evaluated_items": classes_covered(result),
            "byo_command": byo_command, "created": result["created"], "settings": {k: s[k] for k in SAME},
            "configs": configs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=WORK",
                   help="an examples/byo.sh work dir (WORK/eval/results.json), e.g. fashion-mnist=/tmp/byo-fmnist")
    p.add_argument("--default-eval", type=Path, default=None,
                   help="directory for (or holding) bundles/default's evaluation (default: a new temporary one)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default="byo.example")
    args = p.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = serving.loadavg()
    models = []
    for run in args.run:
        label, work = run.split("=", 1)
        result = json.loads((Path(work) / "eval" / "results.json").read_text())
        models.append(summarize(f"imported, standard-trained ({label})", result, f"examples/byo.sh WORK {label}"))
    settings = models[0]["settings"]
    for m in models[1:]:
        if m["settings"] != settings:
            raise SystemExit(f"{m['label']}: evaluated with {m['settings']}, the first run with {settings}")
    default_dir = args.default_eval or Path(f"/tmp/robustgate-byo-default-{int(time.time())}")
    if not (default_dir / "eval" / "results.json").is_file():
        eval_default({**settings}, default_dir, log)
    default = json.loads((default_dir / "eval" / "results.json").read_text())
    summary = summarize("robustgate's own backbone (bundles/default, adversarially trained)", default, None)
    if summary["settings"] != settings:
        raise SystemExit(f"bundles/default evaluated with {summary['settings']}, the runs with {settings}")
    res = {"command": "python bench/byo/example.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": serving.machine(), "load_average_start": load_start, "load_average_end": serving.loadavg(),
           "settings": settings, "models": [summary, *models]}
    out = Path(args.out_dir)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(res))
    log(f"wrote {out / args.name}.json and .md")
    return 0


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    cols = [f"{a}@{e}" for e in s["eps"] for a in s["attacks"]]
    lines = [
        "# Bring your own classifier: the example's figures", "",
        f"Command: `{r['command']}` ({r['started_utc']} to {r['finished_utc']}; revision {m['robustgate_revision']}). "
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs (load average {r['load_average_start']} "
        f"at the start).", "",
        f"The same red-team matrix for every model: attacks {', '.join(s['attacks'])}; l∞ ε {', '.join(map(str, s['eps']))}; "
        f"the first {s['n']} test images; PGD/BPDA {s['steps']} steps; Square {s['queries']} queries per image. "
        "`none` is the bare model, `magnet` the model behind a MagNet detector (action reject) fitted on the "
        "model's own data. Robust accuracy counts an attacked image that is rejected, or accepted and correctly "
        "classified (docs/EVALUATION.md); the worst case is over the attacks at that ε.", "",
        "| model | data | config | clean acc | false rejections | " + " | ".join(cols) + " | "
        + " | ".join(f"worst @{e}" for e in s["eps"]) + " |",
        "| --- " * (5 + len(cols) + len(s["eps"])) + "|",
    ]
    for model in r["models"]:
        for name, c in model["configs"].items():
            cells = [f"{c['robust_accuracy'][k]:.3f}" if k in c["robust_accuracy"] else "skipped" for k in cols]
            worst = [f"{c['worst_case'][str(e)]:.3f}" if str(e) in c["worst_case"] else "" for e in s["eps"]]
            lines.append(f"| {model['label']} | {model['data']} | {name} ({', '.join(c['stages']) or 'no stage'}) | "
                         f"{c['clean_accuracy']:.3f} | {c['false_rejection_rate']:.3f} | " + " | ".join(cells) + " | "
                         + " | ".join(worst) + " |")
    lines += ["", "Classes of the evaluated items (robustgate eval takes the first n test items; an ImageFolder's "
              "test split is a seeded shuffle of its classes):", ""]
    for model in r["models"]:
        lines.append(f"- {model['label']}: " + ", ".join(f"{k} {v}" for k, v in model["classes_of_evaluated_items"].items()))
    lines += ["", "Commands:", ""]
    for model in r["models"]:
        lines.append(f"- {model['label']}: " + (f"`{model['byo_command']}`, then " if model["byo_command"] else "")
                     + f"`{model['eval_command']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
