"""Issue 22's targets: query-only attacks through a live proxy, undefended vs the default pipeline.

    python bench/redteam/endpoint.py --bundle BUNDLE [--n 200] [--offset 0] [--budgets 5000] \\
        [--attacks square,hopskipjump,...] [--arms undefended,defended] [--pipeline deploy/default.yaml] \\
        [--surrogate bundles/default] [--outputs logits|top_k|label|aaa] --out bench/results/redteam.endpoint
    python bench/redteam/endpoint.py --render --out bench/results/redteam.endpoint   # OUT.md again from OUT.json

For each arm a real ``robustgate serve`` (bench/hardening/common.Serve, loopback, in-process ONNX
Runtime) serves BUNDLE: ``undefended`` with no stage, ``defended`` with the stages of
``--pipeline`` (deploy/default.yaml: what a user gets without writing a config); then the user's
command, ``robustgate eval --threat endpoint --url ...``, attacks it (attacks/endpoint_redteam.py:
ART's Square and HopSkipJump, the stateful-defense adaptations, a transfer attack from
``--surrogate``) and, on the defended arm, runs the benign streams. The defended arm answers with
``--pipeline``'s output policy (deploy/default.yaml's: the label), the undefended arm with the model's
logits (a bare model server's answer); ``--outputs`` sets the policy both arms answer with instead
(what a score-based attack reads: logits, rounded top-k probabilities, the label alone, AAA's
margins). BUNDLE should be the usual
customer's model: standard-trained (``robustgate train --method standard`` or an imported one,
e.g. bench/byo/example.py's), with the pipeline's defenses fitted for it (``robustgate fit``);
bench/redteam/endpoint_bundle.sh builds the record's by script.

Results: OUT.json (both arms' reports whole, the targets, and what was attacked: the backbone's
sha256 and each defended stage's fit and calibration from bundle.yaml) and OUT.md (the same, one
table per arm, targets). A success rate over n = 200 images is an estimate with a few points of
binomial error either way, so each success target gives its exact (Clopper-Pearson) 95% interval
beside the point estimate, which alone decides "met"; ``--offset`` attacks another slice of the test
set (the benign images follow the attacked ones), to see how far one slice's figure is from
another's. ``--render`` writes OUT.json's targets and OUT.md again from OUT.json alone (no attack
runs; the report says when it was rendered).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "hardening"))
from common import Serve, machine  # noqa: E402  (bench/hardening/common.py)

ARMS = ("undefended", "defended")
TARGET_BUDGET = 5000


def defended_stages(pipeline: Path, add: list[str], drop: list[str] = ()) -> list[dict]:
    """``--pipeline``'s stages but those named in ``drop`` (``--drop-stage``), then each ``--add-stage``
    (a YAML mapping) appended."""
    stages = list(yaml.safe_load(pipeline.read_text()).get("pipeline", {}).get("stages", []))
    missing = set(drop) - {s["name"] for s in stages}
    if missing:
        raise SystemExit(f"--drop-stage: {pipeline} has no stage named {', '.join(sorted(missing))}")
    return [s for s in stages if s["name"] not in drop] + [yaml.safe_load(text) for text in add]


def bundle_record(bundle: Path, stages: list[dict]) -> dict:
    """What was attacked, from BUNDLE's bundle.yaml: the backbone's ONNX sha256 and provenance, and
    for each defended stage fitted in the bundle its kind, parameters, threshold and calibration (the
    defended figures depend on them: a detector calibrated on other data refuses a different share)."""
    spec = yaml.safe_load((bundle / "bundle.yaml").read_text())
    fitted = spec.get("defenses") or {}
    defenses = {}
    for stage in stages:
        d = fitted.get(stage.get("name"))
        if d is not None:
            calibration = {k: v for k, v in (d.get("calibration") or {}).items() if k != "quantiles"}
            defenses[stage["name"]] = {"kind": d.get("kind"), "params": d.get("params"),
                                       "threshold": d.get("threshold"), "calibration": calibration}
    return {"backbone_sha256": ((spec.get("backbone") or {}).get("onnx") or {}).get("sha256"),
            "provenance": spec.get("provenance"), "defenses": defenses}


def arm_config(arm: str, bundle: Path, pipeline: Path, threads: int, add: list[str] = (),
               outputs: str | None = None, drop: list[str] = ()) -> dict:
    """The served config: ``--pipeline``'s stages and ``--add-stage`` (none undefended) over BUNDLE,
    one process; ``outputs``: the output policy both arms answer with (None: ``--pipeline``'s for the
    defended arm, the model's logits for the undefended one)."""
    cfg = yaml.safe_load(pipeline.read_text())
    if outputs is not None:
        cfg["outputs"] = {**(cfg.get("outputs") or {}), "policy": outputs}
    elif arm == "undefended":
        cfg.pop("outputs", None)
    cfg.setdefault("pipeline", {})["stages"] = defended_stages(pipeline, list(add), list(drop))
    cfg["bundle"] = str(bundle.resolve())
    cfg.setdefault("server", {})["workers"] = 1  # one history: the memory store is per process
    cfg["backend"] = {"kind": "onnxruntime", "onnxruntime": {"intra_op_threads": threads}}
    if arm == "undefended":
        cfg["pipeline"] = {**cfg.get("pipeline", {}), "stages": []}
    return cfg


def arm_outputs(cfg: dict) -> dict:
    """A served config's ``outputs`` section (none: the logits)."""
    return cfg.get("outputs") or {"policy": "logits"}


def detection_stages(stages: list[dict]) -> list[str]:
    """The names of the ``kind: stateful`` stages among ``stages``: their refusals are the detections."""
    return [s["name"] for s in stages if s.get("kind") == "stateful"] or ["stateful"]


def run_arm(arm: str, args: argparse.Namespace, work: Path) -> dict:
    """One arm: serve, attack, read the report (``--reuse``: an arm already in ``--work`` is read)."""
    if args.reuse and (work / f"{arm}.done.json").is_file():
        print(f"[{arm}] reusing {work / (arm + '.done.json')}", flush=True)
        return json.loads((work / f"{arm}.done.json").read_text())
    cfg_path = work / f"{arm}.yaml"
    cfg_path.write_text(yaml.safe_dump(arm_config(arm, args.bundle, args.pipeline, args.threads, args.add_stage,
                                                  args.outputs, args.drop_stage), sort_keys=False))
    out = work / arm
    (work / f"{arm}-serve").mkdir(parents=True, exist_ok=True)
    serve = Serve(cfg_path, workdir=work / f"{arm}-serve")
    try:
        cmd = [str(Path(sys.executable).with_name("robustgate")), "eval", "--threat", "endpoint",
               "--url", serve.url, "--bundle", str(args.bundle),
               "--attacks", args.undefended_attacks if arm == "undefended" and args.undefended_attacks else args.attacks,
               "--queries", args.budgets, "--n", str(args.n), "--offset", str(args.offset),
               "--benign-n", str(args.benign_n),
               "--benign-clients", str(args.benign_clients), "--eps", str(args.eps), "--out", str(out),
               "--detection-stages", ",".join(detection_stages(defended_stages(args.pipeline, args.add_stage,
                                                                               args.drop_stage)))]
        if args.hsj_evals:
            cmd += ["--hsj-evals", *map(str, args.hsj_evals)]
        if args.benign_per_query is not None:
            cmd += ["--benign-per-query", str(args.benign_per_query)]
        if args.surrogate and "transfer" in args.attacks.split(","):
            cmd += ["--surrogate", str(args.surrogate)]
        if arm == "undefended":
            cmd.append("--no-benign")  # no stage: nothing to refuse
        if not args.progress:
            cmd.append("--no-progress")
        print(f"[{arm}] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        report = json.loads((out / "results.json").read_text())
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        report["served_config"] = serve.config
        (work / f"{arm}.done.json").write_text(json.dumps(report, default=str))
        return report
    finally:
        serve.stop()


def clean_correct(bundle: Path, n: int, offset: int = 0) -> list[bool]:
    """Whether the served model classifies each attacked image (the bundle's ``n`` test items from
    ``offset``, what ``eval --threat endpoint`` attacks) correctly before any attack: an image it already
    gets wrong is a "success" at the attacker's first query, which no defense of queries can prevent."""
    import numpy as np
    import onnxruntime as ort

    from robustgate.models.bundle import Bundle
    from robustgate.models.data import bundle_splits

    b = Bundle.load(bundle)
    x, y = bundle_splits(b).take("test", n, offset)
    sess = ort.InferenceSession(str(b.onnx_path()), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]
    return (logits.argmax(1) == y.numpy()).tolist()


def success_among_correct(cell: dict, correct: list[bool]) -> float:
    """Attack success over the images the model classified correctly (items are in image order)."""
    hits, n = successes_among_correct(cell, correct)
    return hits / n if n else float("nan")


def successes_among_correct(cell: dict, correct: list[bool]) -> tuple[int, int]:
    """(successes, images) over the images the model classified correctly."""
    hits = [it["success_at"] is not None for it, ok in zip(cell["items"], correct) if ok]
    return sum(hits), len(hits)


def success_value(cell: dict, correct: list[bool]) -> tuple[float, str]:
    """The success rate over the correctly classified images and its text for a target line:
    ``"10.8% (20 of 185; 95% CI 6.7-16.2%)"``, the interval exact (Clopper-Pearson, scipy)."""
    from scipy.stats import binomtest

    hits, n = successes_among_correct(cell, correct)
    if not n:
        return float("nan"), "no correctly classified image"
    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
    return hits / n, f"{100 * hits / n:.1f}% ({hits} of {n}; 95% CI {100 * ci.low:.1f}-{100 * ci.high:.1f}%)"


def _cell(report: dict, attack: str, budget: int) -> dict | None:
    return next((c for c in report.get("cells", []) if c["attack"] == attack and c["budget"] == budget
                 and c.get("status") == "done"), None)


def targets(arms: dict[str, dict], correct: list[bool], policy: str = "logits",
            departures: list[str] = ()) -> list[dict]:
    """Issue 22's target lines that these arms measure (a line is absent when its cell did not run).
    Success is counted over the images the model classifies correctly (``correct``; the tables show
    both): the images it already gets wrong are lost before the first query. ``policy``: the output
    policy the undefended arm answered with; the undefended lines (the attacks' strength) are the issue's only
    with the model's own scores, so another policy's undefended arm is reported, not targeted.
    ``departures``: how the defended arm departs from ``--pipeline`` (:func:`departures`); then it is not
    the default pipeline and its
    success and detection lines are reported, not targeted (the benign lines are the stateful stage's own)."""
    rows = []
    und, dfd = arms.get("undefended"), arms.get("defended")
    if policy != "logits":
        und = None
    of = f"of the {sum(correct)} correctly classified images"
    for attack in ("square", "hopskipjump"):
        if und and (c := _cell(und, attack, TARGET_BUDGET)):
            s, text = success_value(c, correct)
            rows.append({"target": f"{attack} at {TARGET_BUDGET} queries, undefended: success >= 80% ({of})",
                         "value": text, "met": s >= 0.80})
        if dfd and not departures and (c := _cell(dfd, attack, TARGET_BUDGET)):
            m = c["metrics"]
            s, text = success_value(c, correct)
            rows.append({"target": f"{attack} at {TARGET_BUDGET} queries, default pipeline: success <= 10% ({of})",
                         "value": text, "met": s <= 0.10})
            q = m["queries_to_first_detection_median"]
            rows.append({"target": f"{attack} at {TARGET_BUDGET} queries, default pipeline: median queries to "
                                   f"detection <= 50", "value": "never detected" if q is None else f"{q:g}",
                         "met": q is not None and q <= 50})
    if dfd and dfd.get("benign"):
        # the stateful stage's false positives: its rejections and blocks (``detected``), not the other
        # stages' own false rejections (MagNet's are calibrated apart, to 1%; the table shows all refusals)
        b = dfd["benign"]
        worst_q = max(v["detected_share"] for v in b.values())
        worst_c = max(v["clients_ever_blocked_share"] for v in b.values())
        rows.append({"target": "benign streams: queries rejected by the stateful stage <= 0.5% (worst stream)",
                     "value": f"{100 * worst_q:.2f}%", "met": worst_q <= 0.005})
        rows.append({"target": "benign streams: clients ever blocked <= 0.1% (worst stream)",
                     "value": f"{100 * worst_c:.2f}%", "met": worst_c <= 0.001})
    return rows


def _g(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def answers(outputs: dict[str, dict]) -> str:
    """``{arm: outputs}`` -> "`outputs: {...}`" (the same for every arm) or one per arm."""
    texts = {arm: f"`outputs: {json.dumps(o)}`" for arm, o in outputs.items()}
    if len(set(texts.values())) == 1:
        return f"{next(iter(texts.values()))} (both arms)"
    return "; ".join(f"{text} ({arm})" for arm, text in texts.items())


def markdown(result: dict) -> str:
    offset = result.get("offset", 0)
    lines = ["# Query-only attacks through a live proxy: undefended vs the default pipeline\n",
             f"Command: `{result['command']}` ({result['started_utc']}, "
             f"revision {result['machine']['robustgate_revision']}).\n"]
    if result.get("rendered_utc"):
        lines.append(f"Rendered again from its JSON, no attack rerun: `{result['render_command']}` "
                     f"({result['rendered_utc']}, revision {result['render_revision']}).\n")
    lines += [
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; client and proxy on the same "
             f"machine, loopback gRPC. Bundle `{result['bundle']}` ({result['bundle_note']}); "
             f"defended pipeline: the stages of `{result['pipeline']}` (less any --drop-stage, and any --add-stage): "
             f"{', '.join(s['name'] + ' (' + s['kind'] + ', ' + s.get('action', 'reject') + ')' for s in result['defended_stages']) or 'none'}. "
             f"Answers: {answers(outputs_by_arm(result))} "
             "(docs/OPERATIONS.md, \"Output policies\": what the attacker reads of an accepted query).\n",
             f"Attacked: the test set's images {offset} to {offset + len(result['clean_correct']) - 1}; the benign "
             "streams' images follow them. "
             f"The model classifies {sum(result['clean_correct'])} of the {len(result['clean_correct'])} attacked images "
             "correctly before any attack; the others count as successes at the first query (no defense of queries "
             "can prevent them), so the targets read the success over the correctly classified ones. "
             "Success: the attacker received an accepted answer with a wrong label for a query within "
             f"l∞ ε = {result['eps']} of the clean image (attacks/endpoint_redteam.py). Each image's attack is a "
             "fresh client identity (Sybil: several); a blocked attack stops. A success target's interval is the "
             "exact binomial 95% interval of its rate (n images is one draw of the test set); the point estimate "
             "decides \"met\".\n"]
    tms = [c["threat_model"] for rep in result["arms"].values() for c in rep["cells"] if c.get("status") == "done"]
    knobs = ([f"Square's p_init {t['p_init']:g}" for t in tms if "p_init" in t][:1]
             + [f"HopSkipJump's gradient estimate {t['hsj_evals']['init_eval']}·√t queries at iteration t, at most "
                f"{t['hsj_evals']['max_eval']}" for t in tms if "hsj_evals" in t][:1])
    if knobs:  # older reports did not record them
        lines.append(f"Attack settings (ART): {'; '.join(knobs)}.\n")
    rec = result.get("bundle_record")
    if rec:  # what was attacked: the backbone and each fitted stage's fit (bundle.yaml)
        lines.append(f"Backbone ONNX sha256 `{rec['backbone_sha256']}`. Fitted stages (bundle.yaml):\n")
        for name, d in rec["defenses"].items():
            cal = d["calibration"]
            fit = cal.get("fit") or {}
            lines.append(f"- `{name}` ({d['kind']}): threshold {_g(d['threshold'])} at target FPR {_g(cal.get('target_fpr'))} "
                         f"(validation FPR {_g(cal.get('val_fpr'))}, n {cal.get('n_val')}; test FPR {_g(cal.get('test_fpr'))}, "
                         f"n {cal.get('n_test')}; {fit.get('n_train', '?')} training images); params "
                         f"`{json.dumps(d['params'], sort_keys=True)}`")
        lines.append("")
    for arm, rep in result["arms"].items():
        lines += [f"## {arm} ({rep['wall_seconds']:.0f} s)\n",
                  "| attack | budget | n | success | success, correctly classified images | detected | median queries to detection | completed before detection | median queries to success | attack queries |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in rep["cells"]:
            if c.get("status") != "done":
                lines.append(f"| {c['attack']} | {c['budget']} | | {c.get('status')}: {c.get('reason', '')} | | | | | | |")
                continue
            m = c["metrics"]
            q = m["queries_to_first_detection_median"]
            qs = m["queries_to_success_median"]
            lines.append(f"| {c['attack']} | {c['budget']} | {m['n']} | {100 * m['attack_success_rate']:.1f}% | "
                         f"{100 * success_among_correct(c, result['clean_correct']):.1f}% | {100 * m['detected_share']:.1f}% | {'-' if q is None else f'{q:g}'} | "
                         f"{100 * m['completed_before_detection_share']:.1f}% | {'-' if qs is None else f'{qs:g}'} | "
                         f"{m['attack_queries']:,} |")
        if rep.get("benign"):
            lines += ["", "Benign streams (no attack; each stream over its clients):", "",
                      "| stream | queries | clients | refused (any stage) | detected (stateful stage, blocks) | clients ever blocked |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for name, v in rep["benign"].items():
                lines.append(f"| {name} | {v['queries']:,} | {v['clients']} | {100 * v['refused_share']:.2f}% | "
                             f"{100 * v['detected_share']:.2f}% | {100 * v['clients_ever_blocked_share']:.2f}% |")
        lines.append("")
    lines += ["## Targets (issue 22)\n"]
    if departures(result):
        lines += [f"Not the default pipeline ({'; '.join(departures(result))}): its attack lines are "
                  "reported above, not targeted.\n"]
    lines += ["| target | value | met |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="the served bundle (standard-trained, defenses fitted)")
    ap.add_argument("--bundle-note", default="", help="how the bundle was made (goes into the report)")
    ap.add_argument("--pipeline", type=Path, default=ROOT / "deploy" / "default.yaml")
    ap.add_argument("--add-stage", action="append", default=[], metavar="YAML",
                    help="a stage appended to --pipeline's on the defended arm, e.g. the stateful stage "
                         "deploy/default.yaml documents but does not serve yet")
    ap.add_argument("--drop-stage", action="append", default=[], metavar="NAME",
                    help="a stage of --pipeline's left out of the defended arm (e.g. magnet_l1, to attack a "
                         "stateful stage alone)")
    ap.add_argument("--outputs", choices=("logits", "top_k", "label", "aaa"),
                    help="the output policy both arms answer with (outputs.policy; default: --pipeline's)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--attacks", default="square,hopskipjump")
    ap.add_argument("--undefended-attacks", metavar="ATTACKS",
                    help="the undefended arm's attacks, when not --attacks (e.g. only the one an --outputs policy changes)")
    ap.add_argument("--budgets", default=str(TARGET_BUDGET), help="comma-separated query budgets")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0, help="first attacked test image (the benign ones follow them)")
    ap.add_argument("--benign-n", type=int, default=1000)
    ap.add_argument("--benign-clients", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--hsj-evals", type=int, nargs=2, metavar=("INIT", "MAX"),
                    help="HopSkipJump's gradient-estimate queries (robustgate eval's default when not given)")
    ap.add_argument("--benign-per-query", type=int,
                    help="-spacing attacks: benign queries before each attack query (robustgate eval's default: 1)")
    ap.add_argument("--surrogate", type=Path, help="bundle whose backbone the transfer attack uses")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of the proxy")
    ap.add_argument("--work", type=Path, help="folder for the configs, logs and raw reports (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true",
                    help="read an arm that a run with the same --work already finished instead of rerunning it")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redteam.endpoint")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--render", action="store_true",
                    help="write OUT.json's targets and OUT.md again from OUT.json (no attack runs; "
                         "--bundle not needed)")
    args = ap.parse_args(argv)
    command = "python bench/redteam/endpoint.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args.out, command)
    if args.bundle is None:
        ap.error("--bundle is required (except with --render)")
    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS):
        ap.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; known: {', '.join(ARMS)}")
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="robustgate-endpoint-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reports = {arm: run_arm(arm, args, work) for arm in arms}
    result = {
        "command": command, "started_utc": started, "offset": args.offset, "machine": machine(),
        "bundle": str(args.bundle), "bundle_note": args.bundle_note,
        "pipeline": str(args.pipeline.relative_to(ROOT) if args.pipeline.is_relative_to(ROOT) else args.pipeline),
        "defended_stages": defended_stages(args.pipeline, args.add_stage, args.drop_stage), "eps": args.eps,
        "arms": reports, "outputs": {arm: arm_outputs(arm_config(arm, args.bundle, args.pipeline, args.threads,
                                                                  args.add_stage, args.outputs, args.drop_stage))
                                     for arm in arms},
    }
    result["bundle_record"] = bundle_record(args.bundle, result["defended_stages"])
    n = max((len(c["items"]) for rep in reports.values() for c in rep["cells"] if c.get("status") == "done"), default=0)
    result["clean_correct"] = clean_correct(args.bundle, n, args.offset)
    result["dropped_stages"] = list(args.drop_stage)
    result["pipeline_outputs"] = arm_outputs(yaml.safe_load(args.pipeline.read_text()))
    result["targets"] = targets(reports, result["clean_correct"], undefended_policy(result), departures(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, result)
    return 0


def outputs_by_arm(result: dict) -> dict[str, dict]:
    """Each arm's ``outputs`` section; records before 2026-12-06 hold one section, both arms'."""
    outputs = result.get("outputs") or {}
    if "policy" in outputs or not outputs:
        return {arm: outputs or {"policy": "logits"} for arm in result["arms"]}
    return outputs


def departures(result: dict) -> list[str]:
    """How the record's defended arm departs from its ``--pipeline``: stages left out (``--drop-stage``),
    other answers (``--outputs``; records before 2026-12-06 hold no ``pipeline_outputs``: logits then)."""
    out = [f"{name} left out" for name in result.get("dropped_stages", [])]
    served = outputs_by_arm(result).get("defended", {}).get("policy", "logits")
    shipped = (result.get("pipeline_outputs") or {"policy": "logits"}).get("policy", "logits")
    if served != shipped:
        out.append(f"answers {served}, not the pipeline's {shipped}")
    return out


def undefended_policy(result: dict) -> str:
    return outputs_by_arm(result).get("undefended", {}).get("policy", "logits")


def write(out: Path, result: dict) -> None:
    Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(result))
    print(f"wrote {out}.json and {out}.md")


def render(out: Path, command: str) -> int:
    """``--render``: OUT.json's targets and OUT.md written again from OUT.json's arms (no attack runs),
    with when and by which revision it was rendered."""
    path = Path(f"{out}.json")
    if not path.is_file():
        print(f"--render: {path} does not exist", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    result["targets"] = targets(result["arms"], result["clean_correct"], undefended_policy(result),
                                departures(result))
    result.update(render_command=command, rendered_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  render_revision=machine()["robustgate_revision"])
    write(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
