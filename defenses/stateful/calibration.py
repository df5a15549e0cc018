"""Calibrating a stateful detector's threshold on benign query streams.

A stateful score depends on the stream, so the clean scores a threshold is picked from
(defenses.calibration.threshold_at_fpr) come from benign *streams*, each client's queries scored
against that client's earlier ones, of three kinds a real client sends (issue 22):

- distinct images in random order (a client classifying its data);
- exact retries: an image sent again (score 0 by construction, but they are in the denominator);
- benign near-duplicates: the same picture again after a small crop (resized back), a brightness
  change or a JPEG re-encoding.

``benign_streams`` builds such streams from a set of images; ``stream_scores`` runs them through a
copy of the detector with a fresh, private store (never the serving store); ``calibrate_stateful``
sets the threshold and returns the calibration record (defenses.calibration.calibrate's fields plus
``confidence``, ``keys`` and ``val_fpr_upper``). Streams of several kinds of client (``{kind:
streams}``) are calibrated each on its own and the largest threshold is kept, so that every kind
meets the target: the k-NN method's hardest benign client, one that follows every image with ``k - 1``
near-copies, is flagged far more often than a client of the mixed streams above at the same
threshold (defenses/cli.py).

The threshold is chosen with a margin, not at the target: a threshold picked where the validation
FPR just meets the target (the order statistic of defenses.calibration) misses it on fresh traffic
about half the time, and more here because (a) the scores are small integers (match counts in
``[0, k]``), so the FPR moves in steps, and (b) the serving store draws its own secret key, so its
scores are not the calibration's. ``calibrate_stateful`` therefore scores the validation streams
under ``keys`` fresh keys and takes the smallest threshold whose one-sided Clopper-Pearson upper
bound (``confidence``) on the per-query FPR -- the mean count over the keys out of the queries of
one key -- is at most ``target_fpr``: the FPR on fresh benign traffic meets the target with that
confidence (queries treated as independent draws).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from scipy.stats import beta

from robustgate.defenses.calibration import fpr, quantiles
from robustgate.defenses.purify.jpeg import jpeg_roundtrip
from robustgate.defenses.stateful.base import StatefulDetector

NEAR_KINDS = ("crop", "brightness", "jpeg")
TARGET_FPR = 0.005  # issue 22: at most 0.5% of benign queries refused
CONFIDENCE = 0.95  # the calibration's confidence that the FPR on fresh benign traffic meets TARGET_FPR
KEYS = 3  # fresh secret keys the validation streams are scored under


def near_duplicate(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One benign near-duplicate of ``x`` ``[C, H, W]`` in [0, 1]: ``crop`` (1-2 pixels cut from each
    side at random, resized back), ``brightness`` (factor in [0.9, 1.1]) or ``jpeg`` (quality 70-95)."""
    c, h, w = x.shape
    if kind == "crop":
        t, l, b, r = torch.randint(0, 3, (4,), generator=generator).tolist()
        return TF.resized_crop(x, t, l, h - t - b, w - l - r, [h, w], antialias=True).clamp(0, 1)
    if kind == "brightness":
        factor = 0.9 + 0.2 * float(torch.rand((), generator=generator))
        return TF.adjust_brightness(x, factor).clamp(0, 1)
    if kind == "jpeg":
        quality = int(torch.randint(70, 96, (), generator=generator))
        return jpeg_roundtrip(x[None], quality)[0]  # the JPEG purifier's codec (Pillow / libjpeg)
    raise ValueError(f"near-duplicate kind must be one of {NEAR_KINDS}, got {kind!r}")


def benign_streams(x: torch.Tensor, clients: int, generator: torch.Generator, retry_rate: float = 0.1,
                   near_rate: float = 0.1, near_copies: int = 1) -> list[tuple[str, torch.Tensor]]:
    """``x`` ``[N, C, H, W]`` in [0, 1] -> ``clients`` streams ``(client, [M_i, C, H, W])``: the images in
    random order, split evenly; after each image, with probability ``retry_rate`` the same image
    again and with probability ``near_rate`` ``near_copies`` near-duplicates of it (each kind drawn
    uniformly; the k-NN method promises ``k - 1`` of them unflagged, defenses/stateful/knn.py)."""
    if not 1 <= clients <= len(x):
        raise ValueError(f"clients must be in [1, {len(x)}], got {clients}")
    if not isinstance(near_copies, int) or near_copies < 1:
        raise ValueError(f"near_copies must be a positive integer, got {near_copies!r}")
    for name, rate in (("retry_rate", retry_rate), ("near_rate", near_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {rate}")
    order = torch.randperm(len(x), generator=generator)
    streams = []
    for c, part in enumerate(order.tensor_split(clients)):
        items = []
        for i in part.tolist():
            items.append(x[i])
            if float(torch.rand((), generator=generator)) < retry_rate:
                items.append(x[i].clone())
            if float(torch.rand((), generator=generator)) < near_rate:
                for _ in range(near_copies):
                    kind = NEAR_KINDS[int(torch.randint(0, len(NEAR_KINDS), (), generator=generator))]
                    items.append(near_duplicate(x[i], kind, generator))
        streams.append((f"benign-{c}", torch.stack(items)))
    return streams


def stream_scores(detector: StatefulDetector, streams: list[tuple[str, torch.Tensor]], batch: int = 64) -> np.ndarray:
    """Every query's score ``[sum M_i]``, each stream observed in order by a copy of ``detector``
    holding a fresh in-memory store (the serving store is not touched)."""
    total = sum(len(s) for _, s in streams)
    probe = copy.copy(detector)  # shares the fitted parts (an encoder's session), not the store
    probe.store = detector.private_store(max_entries=max(total, 2), max_per_client=max(total, 2),
                                         max_clients=max(len(streams), 1), ttl_s=1e9)
    scores = [probe.observe(client, s[i:i + batch]).numpy() for client, s in streams for i in range(0, len(s), batch)]
    return np.concatenate(scores)


def fpr_upper(flagged: float, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound at ``confidence`` on a false-positive rate from
    ``flagged`` of ``n`` queries (``flagged`` may be a mean over keys, hence a float)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return 1.0 if flagged >= n else float(beta.ppf(confidence, flagged + 1.0, n - flagged))


Streams = list[tuple[str, torch.Tensor]]


def _kind_threshold(val: list[np.ndarray], target_fpr: float, confidence: float) -> float | None:
    """The smallest validation score whose upper bound on the per-query FPR (the mean flagged count
    over the keys' scores ``val``) is at most ``target_fpr``, or None when no score's is."""
    n = val[0].size
    # candidates: every validation score (a continuous score, the k-NN method's, has thousands); the
    # flagged counts (score > t: ties are not flagged) and their bounds for all of them at once
    candidates = np.unique(np.concatenate(val))  # ascending: the first that meets the bound is the smallest
    flagged = np.mean([v.size - np.searchsorted(np.sort(v), candidates, side="right") for v in val], axis=0)
    uppers = np.ones(candidates.size)
    below = flagged < n
    uppers[below] = beta.ppf(confidence, flagged[below] + 1.0, n - flagged[below])  # fpr_upper, vectorised
    meets = np.flatnonzero(uppers <= target_fpr)
    return float(candidates[meets[0]]) if meets.size else None


def calibrate_stateful(detector: StatefulDetector, val_streams: Streams | dict[str, Streams],
                       test_streams: Streams | dict[str, Streams] | None = None,
                       target_fpr: float = TARGET_FPR, confidence: float = CONFIDENCE,
                       keys: int = KEYS) -> dict[str, Any]:
    """Sets ``detector.threshold`` to the smallest score whose upper confidence bound on the benign
    per-query FPR is at most ``target_fpr`` (module docstring) and returns the calibration record
    (test FPR measured on ``test_streams`` under yet another fresh key).

    ``val_streams`` (and ``test_streams``) may be a dict of stream *kinds*, ``{kind: streams}``: each
    kind must meet the target by itself, so the threshold is the largest of the kinds' own (the
    worst kind decides, as the red team reads its benign streams: issue 22's "worst stream"). The
    record's ``val_fpr``, ``test_fpr`` and ``val_fpr_upper`` are then the worst kind's at that
    threshold, ``n_val``/``n_test`` the queries of all kinds, and ``kinds`` has each kind's figures."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    if not isinstance(keys, int) or keys < 1:
        raise ValueError(f"keys must be a positive integer, got {keys!r}")
    fpr_upper(0, 1, confidence)  # validates confidence
    named = isinstance(val_streams, dict)
    val_sets = val_streams if named else {"all": val_streams}
    test_sets = (test_streams if isinstance(test_streams, dict) else {"all": test_streams}) if test_streams else {}
    if named and test_sets and set(test_sets) != set(val_sets):
        raise ValueError(f"test_streams kinds {sorted(test_sets)} differ from val_streams kinds {sorted(val_sets)}")
    vals = {kind: [stream_scores(detector, s) for _ in range(keys)] for kind, s in val_sets.items()}  # fresh keys
    own = {kind: _kind_threshold(v, target_fpr, confidence) for kind, v in vals.items()}
    if all(t is not None for t in own.values()):
        threshold = max(own.values())
    else:  # too few queries to show the target: flag nothing seen in validation
        threshold = float(max(v.max() for vs in vals.values() for v in vs))
    tests = {kind: stream_scores(detector, s) for kind, s in test_sets.items()}
    per_kind = {}
    for kind, v in vals.items():
        flagged = float(np.mean([int((x > threshold).sum()) for x in v]))
        per_kind[kind] = {"threshold": own[kind], "val_fpr": fpr(np.concatenate(v), threshold),
                          "val_fpr_upper": fpr_upper(flagged, v[0].size, confidence), "n_val": int(v[0].size),
                          "test_fpr": fpr(tests[kind], threshold) if kind in tests else None,
                          "n_test": int(tests[kind].size) if kind in tests else None}
    worst = max(per_kind.values(), key=lambda k: k["val_fpr_upper"])
    record = {"target_fpr": float(target_fpr), "threshold": threshold, "val_fpr": worst["val_fpr"],
              "test_fpr": max(k["test_fpr"] for k in per_kind.values()) if tests else None,
              "n_val": sum(k["n_val"] for k in per_kind.values()),
              "n_test": sum(k["n_test"] for k in per_kind.values()) if tests else None,
              "quantiles": quantiles(np.concatenate([x for v in vals.values() for x in v])),
              "confidence": float(confidence), "keys": keys, "val_fpr_upper": worst["val_fpr_upper"]}
    if named:
        record["kinds"] = per_kind
    detector.threshold = threshold
    return record
