"""Benign false detections of the stateful stages against the length of a client's history (issue 22:
<= 0.5% of benign queries refused, <= 0.1% of benign clients ever blocked).

The stages are calibrated on benign streams of about 100 queries per client (robustgate fit,
defenses/stateful/calibration.py); a real client may send thousands. Here ``--clients`` benign
clients each send a stream of ``--per-client`` queries, of two kinds: ``distinct``, Fashion-MNIST
test images (the test set shuffled, split; no retries, no near-duplicates: a client classifying its
data), and ``near``, each image followed by ``k - 1 = 3`` benign near-duplicates of it (a crop, a
brightness change, a JPEG re-encoding, defenses/stateful/calibration.py ``near_duplicate``: what the
k-NN method promises to leave unflagged, and what the calibration's streams hold for 10% of their
images), through the stage
exactly as the proxy runs it (defenses/assemble.py ``build_stages``, defenses/pipeline.py
``observe_clients``: each batch one query per client), for each configuration: the k-NN stage with its
neighbours in the whole history (``window: null``) and in the last ``window`` queries (the default,
256), and Blacklight. Per configuration: the share of queries flagged by position in the client's
stream, each client's detections, and the query at which a stage with ``block_after`` detections
would block it: counted among the client's last ``block_window`` queries (the default, 100), and
counted without a window (``block_window: null``: detections are forgotten only ``ttl_s`` after a
client's last one, longer than these streams).

    .venv/bin/python bench/stateful/long_streams.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "hardening"))
import common  # noqa: E402  (bench/ is not a package)

CONFIGS = {  # name -> the stage (bundles/default's fitted stages and thresholds)
    "knn, whole history": {"name": "stateful_knn", "kind": "stateful", "action": "log", "params": {"window": None}},
    "knn, window 256 (default)": {"name": "stateful_knn", "kind": "stateful", "action": "log"},
    "blacklight": {"name": "stateful", "kind": "stateful", "action": "log"},
}
EDGES = (0, 100, 300, 600, 1000, 1500, 2000, 3000, 5000)


NEAR_COPIES = 3  # the k-NN stage's k - 1


def near_pool(pool: np.ndarray, clients: int, per_client: int) -> np.ndarray:
    """``pool`` rearranged as ``near`` streams (module docstring): client ``c``'s queries at ``c *
    per_client ...``, each of its images followed by NEAR_COPIES near-duplicates (kinds in turn)."""
    from robustgate.defenses.stateful.calibration import NEAR_KINDS, near_duplicate

    g = torch.Generator().manual_seed(0)
    out = np.empty((clients * per_client, *pool.shape[1:]), dtype=np.float32)
    per_image = NEAR_COPIES + 1
    for c in range(clients):
        for i in range(per_client):
            img = torch.from_numpy(pool[c * per_client + i // per_image])
            j = i % per_image
            out[c * per_client + i] = img.numpy() if j == 0 else near_duplicate(img, NEAR_KINDS[j - 1], g).numpy()
    return out


def run(stage_cfg: dict, bundle, pool: np.ndarray, clients: int, per_client: int) -> dict:
    from robustgate.defenses.assemble import PipelineConfig, build_stages
    from robustgate.defenses.pipeline import observe_clients

    (stage,) = build_stages(PipelineConfig.model_validate({"stages": [stage_cfg]}), bundle)
    names = [f"client-{c}" for c in range(clients)]
    flagged = np.zeros((per_client, clients), dtype=bool)
    t0 = time.perf_counter()
    for step in tqdm(range(per_client), desc=stage_cfg["name"], leave=False):
        x = torch.from_numpy(pool[[c * per_client + step for c in range(clients)]])
        scores, _ = observe_clients(stage, x, names)
        flagged[step] = scores.numpy() > stage.defense.threshold
    return {"threshold": float(stage.defense.threshold), "flagged": flagged, "seconds": time.perf_counter() - t0}


def first_at(counts: np.ndarray, at_least: int) -> list[int | None]:
    """Per client (column of ``counts`` [queries, clients]): the 1-based query at which the count first
    reaches ``at_least``, or None."""
    hit = counts >= at_least
    return [int(np.argmax(hit[:, c])) + 1 if hit[:, c].any() else None for c in range(counts.shape[1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=2500, help="distinct test images per client")
    ap.add_argument("--block-after", type=int, default=5)
    ap.add_argument("--block-window", type=int, default=100)
    ap.add_argument("--out", default="stateful.long_streams")
    args = ap.parse_args(argv)
    if args.clients * args.per_client > 10_000:
        raise SystemExit("--clients x --per-client must be at most 10,000 (the test set)")
    from robustgate.models.bundle import Bundle

    bundle = Bundle.load(REPO / "bundles" / "default")
    distinct = common.test_images(args.clients * args.per_client)[0]
    pools = {"distinct": distinct, "near": near_pool(distinct, args.clients, args.per_client)}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    edges = [e for e in EDGES if e < args.per_client] + [args.per_client]
    rows = {}
    for (stream, pool), (config, cfg) in ((p, c) for p in pools.items() for c in CONFIGS.items()):
        name = f"{stream}: {config}"
        r = run(cfg, bundle, pool, args.clients, args.per_client)
        f = r["flagged"]
        cum = np.cumsum(f, axis=0)
        rows[name] = {
            "threshold": r["threshold"], "seconds": round(r["seconds"], 1),
            "flagged_by_position": [{"from": a, "to": z, "queries": int(f[a:z].size), "flagged": int(f[a:z].sum())}
                                    for a, z in zip(edges[:-1], edges[1:])],
            "detections_per_client": cum[-1].tolist(),
            "blocked_at_query": first_at(cum, args.block_after),
            "blocked_at_query_windowed": first_at(cum - np.concatenate(
                [np.zeros((min(args.block_window, len(cum)), args.clients), int), cum[:-args.block_window]]),
                args.block_after)}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "flagged_by_position"}), flush=True)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    command = " ".join(["python", "bench/stateful/long_streams.py", *(argv if argv is not None else sys.argv[1:])])
    data = {"command": command, "started_utc": started, "revision": revision, "machine": common.machine(),
            "clients": args.clients, "per_client": args.per_client, "block_after": args.block_after,
            "block_window": args.block_window, "configs": rows}
    lines = ["# Benign false detections of the stateful stages against a client's history length", "",
             f"Command: `{command}` ({started}, revision {revision}); machine: {data['machine']['cpu']}, "
             f"{data['machine']['cores']} cores.", "",
             f"{args.clients} benign clients, each a stream of {args.per_client:,} queries: `distinct` Fashion-MNIST "
             f"test images (no retries, no near-duplicates), or `near`: each image followed by {NEAR_COPIES} benign "
             "near-duplicates (crop, brightness, JPEG), what the k-NN stage promises to leave unflagged. One query "
             "per client per batch through the stage as the proxy runs it (`build_stages`, `observe_clients`), "
             "bundles/default's fitted stages and thresholds (calibrated on streams of about 100 queries per "
             "client). A query is flagged when its score is over the threshold.",
             "", "Share of queries flagged, by position in the client's stream:", "",
             "| configuration | threshold | " + " | ".join(f"{a}-{z}" for a, z in zip(edges[:-1], edges[1:])) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in edges[1:]) + " |"]
    for name, r in rows.items():
        cells = [f"{b['flagged'] / b['queries']:.2%}" for b in r["flagged_by_position"]]
        lines.append(f"| {name} | {r['threshold']:.4g} | " + " | ".join(cells) + " |")
    lines += ["", f"Detections per client, and the query at which `block_after: {args.block_after}` would block it "
              f"(none: never within the stream), counting its detections among its last {args.block_window} queries "
              "(`block_window`, the default) or all of them (`block_window: null`):", "",
              f"| configuration | detections per client | blocked at query, block_window {args.block_window} | "
              "blocked at query, no window |", "| --- | --- | --- | --- |"]

    def queries(qs: list) -> str:
        return ", ".join("none" if q is None else f"{q:,}" for q in qs)

    for name, r in rows.items():
        lines.append(f"| {name} | {', '.join(map(str, r['detections_per_client']))} | "
                     f"{queries(r['blocked_at_query_windowed'])} | {queries(r['blocked_at_query'])} |")
    lines.append("")
    js, md = common.write_results(args.out, data, "\n".join(lines))
    plot(rows, REPO / "bench" / "results" / f"{args.out}.png")
    print("\n".join(lines))
    print(f"wrote {js}, {md} and the plot")
    return 0


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        mids = [(b["from"] + b["to"]) / 2 for b in r["flagged_by_position"]]
        ax.plot(mids, [100 * b["flagged"] / b["queries"] for b in r["flagged_by_position"]], marker="o", label=name,
                linestyle="--" if name.startswith("near") else "-")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="target: 0.5% of benign queries")
    ax.set_xlabel("position of the query in the client's stream")
    ax.set_ylabel("benign queries flagged (%)")
    ax.set_title("Stateful stages: benign false detections vs history length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
