"""The README's probe, recorded: ``robustgate probe`` against ``deploy/default.yaml``, served here.

    .venv/bin/python bench/probe/run.py [--config deploy/default.yaml] [--n 200]

Starts ``robustgate serve --config CONFIG`` on free loopback ports (bench/hardening/common.py's
``Serve``), runs attacks/probe.py's ``probe()`` against it -- n clean Fashion-MNIST test images and
the same n attacked by PGD on the backbone alone (l-inf ``--eps``, non-adaptive: it does not know
the served detector) -- stops the server and writes bench/results/probe.run.json and .md with the
command, the machine and the counts (sent / accepted / flagged / rejected / correct).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hardening"))
import common  # noqa: E402  (bench/ is not a package)

from robustgate.attacks.probe import probe  # noqa: E402


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# `robustgate probe` against the served default pipeline", "",
             f"Command: `{r['command']}`; {r['started_utc']}; {m['cpu']}, {m['cores']} cores, revision "
             f"{m['robustgate_revision']}; server: `{r['server_command']}` with `{r['config']}`.", "",
             f"PGD: l∞ ε {r['eps']}, {r['steps']} steps, crafted on the backbone alone (not adaptive to the detector).", "",
             "| images | sent | accepted | flagged | rejected | correct |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("clean", "pgd"):
        c = r[name]
        lines.append(f"| {name} | {c['sent']} | {c['accepted']} | {c['flagged']} | {c['rejected']} | {c['correct']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="deploy/default.yaml", help="the proxy config served (relative to the repository)")
    ap.add_argument("--bundle", default="bundles/default", help="local bundle whose backbone the PGD attack runs on")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--name", default="probe.run", help="writes OUT_DIR/NAME.json and OUT_DIR/NAME.md")
    args = ap.parse_args()

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    server = common.Serve(common.REPO / args.config)
    try:
        counts = probe(server.url, str(common.REPO / args.bundle), n=args.n, model=server.model, eps=args.eps,
                       steps=args.steps)
    finally:
        server.stop()
    result = {"command": " ".join(["python", *sys.argv]), "started_utc": started, "machine": common.machine(),
              "config": args.config, "server_command": server.command, "bundle": args.bundle, "n": args.n,
              "eps": args.eps, "steps": args.steps, "clean": counts["clean"], "pgd": counts[f"pgd eps={args.eps:g}"]}
    js, md = common.write_results(args.name, result, markdown(result), args.out_dir)
    print(markdown(result))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
