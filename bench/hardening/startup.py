"""Time to ready: how long a fresh ``robustgate serve`` (deploy/default.yaml, bundles/default) takes from
its start to the first ServerReady that answers true -- a rollout's, a scale-up's or a restarted
pod's wait before the Service sends it traffic -- with ``server.workers`` 1 and 2, and what the
imports alone cost (a new Python process importing the supervisor's module, a serving process's
modules, torch, and diffusers, which only a pipeline with a diffusion stage imports:
defenses/purify/diffusion.py).

Per start: ``robustgate serve`` as a subprocess (bench/hardening/common.py ``Serve``, free ports) timed
from the spawn to the line that says it serves and to the first ServerReady true, then stopped
(SIGTERM). ``--starts`` starts per worker count, the counts interleaved; once ready, each process's memory
(smaps_rollup: Rss, Pss, private); the import rows are the median of ``--starts`` fresh processes each.

    .venv/bin/python bench/hardening/startup.py     # ~1 min

Writes bench/results/hardening.startup.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

CONFIG = common.REPO / "deploy" / "default.yaml"
IMPORTS = {  # row -> the statement a fresh interpreter runs
    "python alone": "pass",
    "robustgate.proxy.serve (the supervisor of server.workers processes: no torch)": "import robustgate.proxy.serve",
    "robustgate.proxy.server + defenses.assemble (what every serving process imports)":
        "import robustgate.proxy.server, robustgate.defenses.assemble",
    "torch": "import torch",
    "diffusers (a pipeline with a diffusion stage only)": "import diffusers",
}


def import_seconds(statement: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=common.REPO)
    return time.perf_counter() - t0


def memory_mib(pid: int) -> dict[str, int]:
    """Resident, proportional and private (dirty) memory of ``pid`` in MiB (/proc/PID/smaps_rollup):
    the shared libraries' pages count once per process in Rss, split among the processes in Pss."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value) // 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Private_Dirty"]}


def one_start(workers: int) -> dict:
    t0 = time.perf_counter()
    server = common.Serve(CONFIG, overrides={"server": {"workers": workers}})  # returns once ServerReady is true
    ready = time.perf_counter() - t0
    try:
        out = {"workers": workers, "ready_s": ready, "memory": {"server": memory_mib(server.pid)}}
        if workers > 1:  # the supervisor's children: the workers (and multiprocessing's small resource tracker)
            kids = [int(c) for t in Path(f"/proc/{server.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
            out["memory"]["children"] = sorted((memory_mib(k) for k in kids), key=lambda m: m["private"])
        return out
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=5, help="starts per worker count, and processes per import row")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default="hardening.startup")
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    given = argv if argv is not None else sys.argv[1:]
    data = {"command": " ".join(["python", "bench/hardening/startup.py", *given]),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": common.machine(),
            "load_average_start": common.loadavg(), "config": str(CONFIG.relative_to(common.REPO)), "starts": []}
    for k in range(args.starts):
        for w in (counts if k % 2 == 0 else counts[::-1]):
            data["starts"].append(one_start(w))
            print(f"start {k + 1}/{args.starts}, {w} workers: ready after {data['starts'][-1]['ready_s']:.2f} s",
                  flush=True)
    data["imports"] = {row: [import_seconds(stmt) for _ in range(args.starts)] for row, stmt in IMPORTS.items()}
    data["load_average_end"] = common.loadavg()

    lines = ["# Time to ready: a fresh robustgate serve until its first ServerReady true", "",
             f"- Command: `{data['command']}`",
             f"- Started {data['started_utc']}; load average at start {data['load_average_start']}, at end "
             f"{data['load_average_end']} ({data['machine']['cores']} cores, {data['machine']['cpu']}; revision "
             f"{data['machine']['robustgate_revision']})",
             f"- `robustgate serve --config {data['config']}`, timed from the spawn to the first ServerReady that "
             f"answers true (the supervisor says it serves once every worker does); {args.starts} starts per "
             "worker count, interleaved", "",
             "| server.workers | ready after, median s | min | max |", "| ---: | ---: | ---: | ---: |"]
    for w in counts:
        t = [s["ready_s"] for s in data["starts"] if s["workers"] == w]
        lines.append(f"| {w} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} |")
    lines += ["", "Memory once ready (MiB, the last start of each count; Pss shares the libraries' pages among the "
              "processes, private is the process's own):", "", "| server.workers | process | Rss | Pss | private |",
              "| ---: | --- | ---: | ---: | ---: |"]
    for w in counts:
        mem = [s["memory"] for s in data["starts"] if s["workers"] == w][-1]
        procs = [("the server" if w == 1 else "the supervisor", mem["server"])]
        procs += [(f"child {i + 1}", m) for i, m in enumerate(mem.get("children", []))]
        lines += [f"| {w} | {name} | {m['rss']} | {m['pss']} | {m['private']} |" for name, m in procs]
    lines += ["", f"Imports in a fresh interpreter (median of {args.starts} processes):", "",
              "| import | seconds |", "| --- | ---: |"]
    lines += [f"| {row} | {statistics.median(t):.2f} |" for row, t in data["imports"].items()]
    lines.append("")
    js, md = common.write_results(args.out, data, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
