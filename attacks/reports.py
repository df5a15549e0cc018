"""Reports of an evaluation: results.json (schema in docs/EVALUATION.md), results.md, plots, and
the sanity table that flags signs of gradient masking.

Sanity checks (Athalye et al. 2018, Sec. 3.1; Carlini et al., "On Evaluating Adversarial
Robustness", 2019):

- ``large_eps``: at the largest l-inf eps >= 0.3 the best white-box attack should bring robust
  accuracy near 0 (flag above ``LARGE_EPS_LIMIT``); a detector that rejects every attacked image
  can legitimately hold it up, so the flag names the rejection rate too;
- ``monotone_eps``: robust accuracy under one attack should not rise with eps;
- ``blackbox_vs_whitebox``: a query-only attack beating every white-box attack means the
  gradients the white-box attacks followed were useless;
- ``adaptive_vs_pgd``: on a configuration with a randomized or non-differentiable stage the
  adaptive attacks (BPDA, EOT, joint) should beat the non-adaptive PGD transferred from the
  backbone: FLAG when the best adaptive attack does worse, ``tie`` when equal (the stage adds
  nothing against transfer, or the adaptive attack is weak -- look at it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_SCHEMA = 1
LARGE_EPS_LIMIT = 0.10
WHITE_BOX_LINF = ("fgsm", "pgd", "autoattack", "bpda", "eot", "joint")
ADAPTIVE = ("bpda", "eot", "joint")


def _done(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c.get("status") == "done"]


def _ra(cells: list[dict], config: str, attack: str, eps: float) -> float | None:
    for c in cells:
        if c["config"] == config and c["attack"] == attack and c["eps"] == eps:
            return c["metrics"]["robust_accuracy"]
    return None


def sanity_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    cells = _done(result["cells"])
    rows = []
    for config, info in result["configs"].items():
        mine = [c for c in cells if c["config"] == config]
        linf = sorted({c["eps"] for c in mine if c["threat_model"]["norm"] == "linf"})
        # large eps
        big = [e for e in linf if e >= 0.3]
        wb = [c for c in mine if c["attack"] in WHITE_BOX_LINF]
        if big and wb:
            e = max(big)
            at = [c for c in wb if c["eps"] == e]
            if at:
                best = min(at, key=lambda c: c["metrics"]["robust_accuracy"])
                v = best["metrics"]["robust_accuracy"]
                rows.append({"check": "large_eps", "config": config, "eps": e, "attack": best["attack"], "value": v,
                             "status": "FLAG" if v > LARGE_EPS_LIMIT else "ok",
                             "detail": f"best white-box robust accuracy {v:.3f} at eps {e:g} (limit {LARGE_EPS_LIMIT}); "
                                       f"rejection rate {best['metrics']['rejection_rate']:.3f}"})
        else:
            rows.append({"check": "large_eps", "config": config, "eps": None, "attack": None, "value": None,
                         "status": "n/a", "detail": "no white-box l-inf attack at eps >= 0.3 in this run"})
        # monotone in eps
        for attack in sorted({c["attack"] for c in mine}):
            seq = sorted((c["eps"], c["metrics"]["robust_accuracy"]) for c in mine if c["attack"] == attack)
            rises = [(a, b) for a, b in zip(seq, seq[1:]) if b[1] > a[1] + 0.02]
            if len(seq) > 1:
                rows.append({"check": "monotone_eps", "config": config, "eps": None, "attack": attack,
                             "value": [r for _, r in seq], "status": "FLAG" if rises else "ok",
                             "detail": "robust accuracy rises with eps: " + ", ".join(
                                 f"{a[0]:g}->{b[0]:g}: {a[1]:.3f}->{b[1]:.3f}" for a, b in rises) if rises
                             else "non-increasing in eps (2-point tolerance)"})
        for e in linf:
            sq = _ra(cells, config, "square", e)
            whites = [v for a in WHITE_BOX_LINF if (v := _ra(cells, config, a, e)) is not None]
            if sq is not None and whites:
                rows.append({"check": "blackbox_vs_whitebox", "config": config, "eps": e, "attack": "square",
                             "value": sq, "status": "FLAG" if sq < min(whites) else "ok",
                             "detail": f"square {sq:.3f} vs best white-box {min(whites):.3f}"})
            pgd = _ra(cells, config, "pgd", e)
            adaptive = {a: v for a in ADAPTIVE if (v := _ra(cells, config, a, e)) is not None}
            if (info.get("randomized") or info.get("non_differentiable")) and pgd is not None and adaptive:
                best_a = min(adaptive, key=adaptive.get)
                v = adaptive[best_a]
                status = "ok" if v < pgd or v == 0.0 else ("tie" if v == pgd else "FLAG")
                rows.append({"check": "adaptive_vs_pgd", "config": config, "eps": e, "attack": best_a,
                             "value": v, "status": status,
                             "detail": f"{best_a} {v:.3f} vs transferred pgd {pgd:.3f}"
                                       + ("; tie: the adaptive attack gains nothing over transfer (the stage adds "
                                          "no robustness, or the adaptive attack is weak)" if status == "tie" else "")})
    return rows


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown(result: dict[str, Any]) -> str:
    cells = result["cells"]
    configs = list(result["configs"])
    lines = [f"# robustgate eval: {result['bundle']['name']}", "",
             f"Bundle `{result['bundle']['path']}` (backbone sha256 {result['bundle']['backbone_sha256'][:12]}…), "
             f"{result['n']} images of the {result.get('data', 'Fashion-MNIST test set')} from offset {result['offset']}. "
             f"Command: `{result['command']}`.", ""]
    if result.get("transfer_from"):
        t = result["transfer_from"]
        lines += [f"**Transfer**: this bundle has no torch twin; the backbone attacks were crafted on the twin of "
                  f"the surrogate bundle `{t['path']}` ({t['name']}, backbone sha256 {t['backbone_sha256'][:12]}…) "
                  f"and scored on this bundle's served pipeline.", ""]
    if result.get("skipped_attacks"):
        lines += ["**Skipped attacks** (not run on this bundle, so no robustness figure below covers them):", ""]
        lines += [f"- `{a}`: {r}" for a, r in result["skipped_attacks"].items()] + [""]
    lines += ["## Clean", "",
             "| config | stages | clean accuracy (accepted & correct) | false-rejection rate | flag rate | latency ms/item |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, info in result["configs"].items():
        m = info["clean"]
        # a stateful stage acts on a client's stream of queries: these attacks send none, so it is not run
        # (defenses/pipeline.py, no client identities); --threat endpoint attacks it
        stages = ", ".join(f"{s['name']}({s['kind']},{s.get('action', 'reject')}"
                           + ("; not run: no client's query stream, see --threat endpoint" if s["kind"] == "stateful"
                              else "") + ")" for s in info["stages"]) or "none"
        lines.append(f"| {name} | {stages} | {_fmt(m['clean_accuracy'])} | {_fmt(m['false_rejection_rate'])} | "
                     f"{_fmt(m['flag_rate'])} | {m['latency_ms_per_item']:.3f} |")
    cert = {n: i["clean"]["certified_accuracy"] for n, i in result["configs"].items() if "certified_accuracy" in i["clean"]}
    if cert:
        lines += ["", "## Certified accuracy (L2, clean inputs)", "", "| config | " + " | ".join(
            f"r={r}" for r in next(iter(cert.values()))) + " |", "| --- |" + " --- |" * len(next(iter(cert.values())))]
        for n, c in cert.items():
            lines.append(f"| {n} | " + " | ".join(_fmt(v) for v in c.values()) + " |")
    lines += ["", "## Robust accuracy (rejected, or accepted and correct)", "",
              "Rows: attack and threat model; columns: configurations (`none` = the undefended backbone "
              "under the same attack).", "",
              "| attack | threat model | " + " | ".join(configs) + " |", "| --- | --- |" + " --- |" * len(configs)]
    keys = sorted({(c["attack"], c["eps"]) for c in cells}, key=lambda k: (k[0], k[1]))
    for attack, eps in keys:
        row = {c["config"]: c for c in cells if c["attack"] == attack and c["eps"] == eps}
        # the threat model of a cell that ran (EOT samples are 1 where nothing is random)
        ran = [c for c in row.values() if c["status"] == "done"] or list(row.values())
        tm = max(ran, key=lambda c: c["threat_model"]["eot"])["threat_model"]
        desc = (f"{tm['norm']} ε={eps:g}, steps {tm['steps']}, restarts {tm['restarts']}, EOT {tm['eot']}"
                + (f", queries {tm['queries']}" if tm.get("queries") else "")
                + (f", twin in {tm['twin_precision']}" if tm.get("twin_precision", "float32") != "float32" else "")
                + f", n {tm['n']}")
        vals = []
        for cfg in configs:
            c = row.get(cfg)
            if c is None:
                vals.append("—")
            elif c["status"] != "done":
                vals.append(f"skipped ({c['reason']})")
            else:
                vals.append(f"{c['metrics']['robust_accuracy']:.3f} (ASR {c['metrics']['attack_success_rate']:.2f})")
        lines.append(f"| {attack} | {desc} | " + " | ".join(vals) + " |")
    det_rows = [(c, name, d) for c in _done(cells) for name, d in c.get("detectors", {}).items()]
    if det_rows:
        lines += ["", "## Detectors (attacked vs clean scores)", "",
                  "| config | detector | attack | ε | threshold | TPR at threshold | clean FPR at threshold | ROC AUC |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c, name, d in det_rows:
            lines.append(f"| {c['config']} | {name} | {c['attack']} | {c['eps']:g} | {_fmt(d.get('threshold'))} | "
                         f"{_fmt(d.get('tpr_at_threshold'))} | {_fmt(d.get('fpr_at_threshold'))} | {d['auc']:.3f} |")
    lines += ["", "## Sanity checks (signs of gradient masking)", "", "| check | config | ε | attack | status | detail |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in result["sanity"]:
        lines.append(f"| {r['check']} | {r['config']} | {_fmt(r['eps'])} | {_fmt(r['attack'])} | **{r['status']}** | {r['detail']} |")
    lines += ["", "## Wall time per cell (s)", "", "| config | attack | ε | seconds |", "| --- | --- | --- | --- |"]
    for c in _done(cells):
        lines.append(f"| {c['config']} | {c['attack']} | {c['eps']:g} | {c['wall_seconds']:.1f} |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result.get("plots", [])), ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], out: Path) -> list[str]:
    files = []
    cells = _done(result["cells"])
    # 1. robust accuracy vs eps, one panel per configuration
    configs = list(result["configs"])
    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3.2), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        for attack in sorted({c["attack"] for c in cells if c["config"] == cfg}):
            pts = sorted((c["eps"], c["metrics"]["robust_accuracy"]) for c in cells
                         if c["config"] == cfg and c["attack"] == attack)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=attack)
        ax.set_title(cfg)
        ax.set_xlabel("eps")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("robust accuracy")
    fig.tight_layout()
    fig.savefig(out / "robust_accuracy_vs_eps.png", dpi=90)
    plt.close(fig)
    files.append("robust_accuracy_vs_eps.png")
    # 2. ROC curves of every detector
    det = [(c, n, d) for c in cells for n, d in c.get("detectors", {}).items()]
    if det:
        fig, ax = plt.subplots(figsize=(5, 4))
        for c, n, d in det:
            ax.plot(d["roc"]["fpr"], d["roc"]["tpr"], label=f"{c['config']}/{n} {c['attack']} ε={c['eps']:g} (AUC {d['auc']:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false-positive rate (clean)")
        ax.set_ylabel("true-positive rate (attacked)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=90)
        plt.close(fig)
        files.append("roc.png")
    # 3. accuracy vs latency
    fig, ax = plt.subplots(figsize=(5, 4))
    for cfg, info in result["configs"].items():
        lat = info["clean"]["latency_ms_per_item"]
        mine = [c["metrics"]["robust_accuracy"] for c in cells if c["config"] == cfg and c["threat_model"]["norm"] == "linf"]
        ax.scatter([lat], [info["clean"]["clean_accuracy"]], marker="o", color="C0")
        if mine:
            ax.scatter([lat], [min(mine)], marker="x", color="C3")
        ax.annotate(cfg, (lat, info["clean"]["clean_accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("served latency, ms per item (log)")
    ax.set_ylabel("accuracy: o clean, x worst-case robust (l-inf)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_latency.png", dpi=90)
    plt.close(fig)
    files.append("accuracy_vs_latency.png")
    # 4. loss surfaces (2-D heat maps) and their 1-D cut along the gradient sign
    surf = result.get("loss_surfaces") or {}
    if surf:
        rows = sum(len(v) for v in surf.values())
        fig, axes = plt.subplots(rows, 2, figsize=(7, 3 * rows), squeeze=False)
        r = 0
        for cfg, pts in surf.items():
            for i, s in enumerate(pts):
                steps = s["steps"]
                axes[r][0].imshow(s["loss"], origin="lower", extent=[steps[0], steps[-1], steps[0], steps[-1]], aspect="auto")
                axes[r][0].set_title(f"{cfg}, test point {i}: cross-entropy", fontsize=7)
                axes[r][0].set_xlabel("step along a random sign direction", fontsize=7)
                axes[r][0].set_ylabel("step along the gradient sign", fontsize=7)
                mid = len(steps) // 2
                axes[r][1].plot(steps, [row[mid] for row in s["loss"]], label="along grad sign")
                axes[r][1].plot(steps, s["loss"][mid], label="along random sign")
                axes[r][1].set_xlabel("step", fontsize=7)
                axes[r][1].legend(fontsize=6)
                r += 1
        fig.tight_layout()
        fig.savefig(out / "loss_surfaces.png", dpi=80)
        plt.close(fig)
        files.append("loss_surfaces.png")
    return files


def write_reports(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Adds the sanity table and plots to ``result`` and writes results.json / results.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["schema_version"] = RESULTS_SCHEMA
    result.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    result["sanity"] = sanity_checks(result)
    result["plots"] = plots(result, out)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    return {"json": out / "results.json", "md": out / "results.md"}
