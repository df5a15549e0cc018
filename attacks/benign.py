"""Benign query streams through the live endpoint: the false-positive side of a stateful defense.

A stateful detector remembers each client's recent queries and flags near-duplicates; real
clients send near-duplicates too. Three streams (issue 22), each split over ``clients`` benign
identities that send their share in order, one ModelInfer per query:

- ``shuffled``: the test images in random order, each once;
- ``retries``: each image sent ``repeats`` times back to back (a client retrying on a timeout);
- ``near_duplicates``: each image, then ``variants`` near-copies a real client produces: a small
  crop resized back, a brightness change, a JPEG re-encoding (one of each in turn; the very
  near-duplicates the stateful detector's threshold is calibrated on,
  defenses/stateful/calibration.py).

Per stream: the share of benign queries refused (any stage, and by the detection stages or a
block), and the share of benign clients ever blocked / ever detected.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm import tqdm

from robustgate.attacks.channel import Channel
from robustgate.attacks.endpoint import GrpcOracle
from robustgate.defenses.stateful.calibration import NEAR_KINDS, near_duplicate
from robustgate.models.client_values import ClientValues

STREAMS = ("shuffled", "retries", "near_duplicates")


def stream(name: str, x: torch.Tensor, seed: int = 0, repeats: int = 3, variants: int = 3) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` -> the stream ``[M, C, H, W]`` in sending order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    if name == "shuffled":
        return x[order]
    if name == "retries":
        return x[order].repeat_interleave(repeats, dim=0)
    if name == "near_duplicates":
        items = []
        for i in order.tolist():
            items.append(x[i])
            items.extend(near_duplicate(x[i], NEAR_KINDS[v % len(NEAR_KINDS)], gen) for v in range(variants))
        return torch.stack(items)
    raise ValueError(f"unknown benign stream {name!r}; known: {STREAMS}")


def run_stream(url: str, model: str, queries: torch.Tensor, clients: int, detection_stages: Sequence[str],
               identity_header: str = "x-client-id", name: str = "stream", progress: bool = True,
               client_values: ClientValues | None = None, channel: Channel | None = None) -> dict[str, Any]:
    """Sends ``queries`` ``[M, C, H, W]`` split in ``clients`` contiguous shares, each from its own
    identity (``{identity_header: "benign-<name>-<i>"}``), and counts the refusals. ``client_values``:
    and ``channel`` as GrpcOracle's."""
    stages = set(detection_stages)
    shares = torch.tensor_split(torch.arange(len(queries)), clients)
    refused = detected = blocked_q = 0
    blocked_clients = detected_clients = 0
    by_stage: dict[str, int] = {}
    bar = tqdm(total=len(queries), desc=f"benign {name}", disable=not progress, leave=False)
    for i, share in enumerate(shares):
        oracle = GrpcOracle(url, model, headers={identity_header: f"benign-{name}-{i}"}, client_values=client_values,
                            channel=channel)
        ever_blocked = ever_detected = False
        try:
            for j in share.tolist():
                reply = oracle.ask(queries[j])
                bar.update(1)
                if not reply.refused:
                    continue
                refused += 1
                if reply.stage is not None:
                    by_stage[reply.stage] = by_stage.get(reply.stage, 0) + 1
                hit = reply.outcome == "blocked" or reply.stage in stages
                detected += hit
                blocked_q += reply.outcome == "blocked"
                ever_blocked |= reply.outcome == "blocked"
                ever_detected |= hit
        finally:
            oracle.close()
        blocked_clients += ever_blocked
        detected_clients += ever_detected
    bar.close()
    m = len(queries)
    return {"queries": m, "clients": clients, "refused_share": refused / m, "detected_share": detected / m,
            "blocked_query_share": blocked_q / m, "clients_ever_blocked_share": blocked_clients / clients,
            "clients_ever_detected_share": detected_clients / clients, "refusals_by_stage": by_stage}


def run_benign_streams(url: str, model: str, x: torch.Tensor, clients: int = 10,
                       detection_stages: Sequence[str] = ("stateful",), identity_header: str = "x-client-id",
                       streams: Sequence[str] = STREAMS, seed: int = 0, repeats: int = 3, variants: int = 3,
                       progress: bool = True, client_values: ClientValues | None = None,
                       channel: Channel | None = None) -> dict[str, Any]:
    """Every stream of ``streams`` over benign images ``x`` ``[N, C, H, W]`` -> {stream: metrics}."""
    if clients < 1 or clients > len(x):
        raise ValueError(f"benign clients must be in [1, {len(x)}] (one image each at least), got {clients}")
    out = {}
    for name in streams:
        q = stream(name, x, seed=seed, repeats=repeats, variants=variants)
        out[name] = {**run_stream(url, model, q, clients, detection_stages, identity_header, name, progress,
                                  client_values, channel),
                     "images": len(x), **({"repeats": repeats} if name == "retries" else {}),
                     **({"variants": variants} if name == "near_duplicates" else {})}
    return out
