"""``robustgate eval --parallel K``: the matrix's cells computed by K worker processes.

Every cell is independent once its configuration's clean pass exists, and finished cells are
cached files (attacks/runner.py), so the workers only fill the cache: each builds its own
:class:`~robustgate.attacks.runner.Evaluation` (the same bundle, configurations and settings, one
torch thread) and computes the cells it is handed; the parent then runs the ordinary sequential
pass, which finds every cell cached and assembles the reports exactly as a one-process run would.
Processes rather than threads: the attacks are Python-heavy torch loops that a shared GIL would
serialize. The workers are spawned, not forked: they know the defenses robustgate registers on
import, not ones a caller registered at run time.

Order, so that no core idles at the end while one long cell runs on: first every configuration's
clean pass; then the adversarial examples of every cell, one task per attack batch (cached batch
by batch; a backbone attack's examples once, shared by every configuration), longest expected
first -- the configuration's measured clean latency per item times a per-attack weight (queries or
steps x samples), a plain heuristic -- so that a long cell (AutoAttack's 500 images, Square on the
diffusion purifier) is split over the workers instead of holding one core while the other idles;
last the cells themselves, which only score the cached examples on the served pipeline.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from robustgate.attacks.suite import ATTACKS

# relative cost of one attack cell per item and unit of pipeline latency (how many forward and
# backward passes it makes with the benchmark's settings); only the order depends on it
ATTACK_WEIGHT = {"square": 500, "autoattack": 400, "eot": 160, "joint": 40, "bpda": 40, "pgd_mi": 40,
                 "feature_pgd": 40, "pgd": 20, "cw": 100, "deepfool": 50, "fgsm": 1}

_worker = None  # this worker process's Evaluation (a process-pool initializer has nowhere else to put it)


def _init_worker(bundle_root: str, configs, settings, out: str) -> None:
    global _worker
    from robustgate.attacks.runner import Evaluation
    from robustgate.models.bundle import Bundle

    torch.set_num_threads(1)
    _worker = Evaluation(Bundle.load(bundle_root), configs, settings, out, progress=False, surface_points=0)


def _clean(config_name: str) -> float:
    """Runs (or finds) the configuration's clean pass; returns its served latency per item (ms)."""
    cfg = _worker.config(config_name)
    served, _ = _worker.built[config_name]
    return float(_worker._clean(cfg, served)["metrics"]["latency_ms_per_item"])


def _part(config_name: str, attack: str, eps: float, start: int) -> str:
    cfg = _worker.config(config_name)
    served, twin = _worker.built[config_name]
    _worker.attack_part(cfg, served, twin, attack, eps, start)
    return f"{config_name} {attack} eps={eps:g} examples from {start}"


def _cell(config_name: str, attack: str, eps: float) -> str:
    cfg = _worker.config(config_name)
    served, twin = _worker.built[config_name]
    clean = _worker._clean(cfg, served)
    _worker._cell(cfg, served, twin, clean, attack, eps)
    return f"{config_name} {attack} eps={eps:g}"


def fill_cache(evaluation, plan: list[tuple[str, str, float]], parallel: int,
               on_done: Callable[[str], None] = lambda label: None) -> None:
    """Computes every cell of ``plan`` ((config name, attack, eps), all of ``evaluation``'s) in
    ``parallel`` worker processes; results land in the cell cache. Raises the first failure."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch and ORT threads
    args = (str(evaluation.bundle.root), evaluation.configs, evaluation.settings, str(Path(evaluation.out)))
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context, initializer=_init_worker,
                             initargs=args) as pool:
        try:
            _schedule(pool, evaluation, plan, on_done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # what has not started never will
            raise


def _schedule(pool: ProcessPoolExecutor, evaluation, plan: list[tuple[str, str, float]],
              on_done: Callable[[str], None]) -> None:
    latency_f = {c.name: pool.submit(_clean, c.name) for c in evaluation.configs}
    _drain(list(latency_f.values()), on_done)
    latency = {name: f.result() for name, f in latency_f.items()}
    # one generating task per (cell, batch); a backbone attack's once, under its first configuration
    generating: dict[tuple, tuple[str, str, float]] = {}
    for cfg, attack, eps in plan:
        if evaluation.skip_reason(cfg, attack) is None:
            generating.setdefault((attack, eps) if ATTACKS[attack].target == "backbone" else (cfg, attack, eps),
                                  (cfg, attack, eps))
    undefended = min(latency.values())  # a backbone attack's cost does not depend on the configuration

    def expected(cfg: str, attack: str) -> float:
        per_item = undefended if ATTACKS[attack].target == "backbone" else latency[cfg]
        return per_item * ATTACK_WEIGHT.get(attack, 50)

    parts = [(*c, start) for c in generating.values() for start in evaluation.part_starts()]
    parts.sort(key=lambda p: expected(p[0], p[1]), reverse=True)
    _drain([pool.submit(_part, *p) for p in parts], lambda label: None)
    cells = sorted(plan, key=lambda c: expected(c[0], c[1]), reverse=True)
    _drain([pool.submit(_cell, *c) for c in cells], on_done)


def _drain(futures: list[Future], on_done: Callable[[str], None]) -> None:
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            label = f.result()  # re-raises a worker's exception here
            on_done(label if isinstance(label, str) else "clean pass")
