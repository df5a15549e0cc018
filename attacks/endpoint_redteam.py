"""The endpoint red team: query-only attacks on a live proxy, with exact per-image query accounting.

Threat model ``endpoint`` (issue 22): the attacker holds test images and a URL, sends ModelInfer
calls and reads what comes back -- logits (score-based attacks see the softmax of them) or only
the label (decision-based), or a refusal. The attacks come from the Adversarial Robustness
Toolbox (ART), run one image at a time against the live endpoint wrapped as an ART
``BlackBoxClassifierNeuralNetwork`` (the ``BlackBoxClassifier`` flavour SquareAttack accepts):

- ``square``: ART ``SquareAttack`` (Andriushchenko et al., ECCV 2020), l-inf, score-based;
- ``hopskipjump``: ART ``HopSkipJump`` (Chen, Jordan, Wainwright, S&P 2020), l-inf, decision-based;
- ``transfer``: PGD (torchattacks) on a surrogate model the attacker trained, each image sent once.

and the adaptations that target stateful defenses (Feng, Mangaokar, Chen, Fernandes, Jha,
Prakash, "Stateful Defenses for Machine Learning Models Are Not Yet Secure Against Black-box
Attacks", CCS 2023; Chen, Carlini, Wagner 2020 for query blinding), applied around any of the
query attacks by :class:`Attacker`:

- ``spacing``: ``benign_per_query`` benign queries (other test images) interleaved before each
  attack query under the same identity, and/or ``wait_s`` seconds between queries -- a history
  that is bounded in entries or time then holds fewer of the attack's near-duplicates;
- ``transform``: each query is randomly transformed before it is sent (a brightness shift and
  uniform pixel noise, projected back into the eps-ball so the sent query is still a valid
  candidate), and a rejected query is re-drawn with a larger transform up to ``resample`` times
  -- the rejection-sampling idea of Feng et al.'s OARS (Oracle-guided Adaptive Rejection
  Sampling), simplified: OARS also tunes the attack's own step size and direction from the
  rejections it leaks, which this adaptation does not;
- ``sybil``: ``identities`` clients; queries go round-robin over them, each client a separate
  gRPC channel sending its own identity (a metadata header, or its own bearer token).

Answers on a refusal (rejected item or blocked client) are handled explicitly, so that every
query the attacker sends is charged and seen: score-based attacks get the one-hot of the true
label (the largest possible margin: a failed query, never kept as an improvement -- what "no
scores" means to a random search that keeps only improvements); decision-based attacks get the
true label (not adversarial). The per-image :class:`Ledger` charges every query against the
budget and stops the attack at exactly ``budget`` queries (ART's own iteration counts are not
query counts); it also decides success, the same way for every attack: **the attacker received an
accepted (or flagged) answer with a label other than the true one for a query within ``eps``
(l-inf) of the clean image** -- what a real attacker needs, whatever the attack returns.

Metrics per cell (:func:`cell_metrics`): robust accuracy (share of images never successfully
attacked within budget), queries until the first detection (a rejection by a stage named in
``detection_stages``, or a block), share of attacks detected, share completed (successful)
before their first detection, and the query totals (exact: the sum of the ledgers equals what
the oracles sent, minus spacing's benign queries, which are counted apart).

Known limits: one image at a time (an attacker running many in parallel looks the same to a
per-client history but different to a global rate limit); ``transform``'s noise is random, not
the paper's learned schedule; the transfer attack is only as good as the surrogate given.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robustgate.attacks.channel import Channel
from robustgate.attacks.endpoint import GrpcOracle, Reply
from robustgate.attacks.threat import ThreatModel, check_perturbation
from robustgate.models.client_values import ClientValues

QUERY_ATTACKS = ("square", "hopskipjump")
HSJ_EVALS = (100, 1000)  # HopSkipJump's (init_eval, max_eval) unless told: ART's init_eval, max_eval cut to 1,000
ADAPTATIONS = ("plain", "spacing", "transform", "sybil")
DEFAULT_BUDGETS = (1000, 5000, 10000)


class BudgetExhausted(Exception):
    """Raised by the ledger instead of sending query ``budget + 1``; ends the ART attack."""


class ClientBlocked(Exception):
    """Raised after a block when the attacker stops (``on_block="stop"``)."""


class Succeeded(Exception):
    """Raised once the ledger holds a success: the attacker has what it came for."""


@dataclass
class Ledger:
    """One image's attack: ``x0`` ``[C, H, W]`` clean, ``y`` true label, ``eps`` l-inf radius,
    ``budget`` queries. Records every attack query's outcome in order."""

    x0: torch.Tensor
    y: int
    eps: float
    budget: int
    detection_stages: frozenset[str]
    queries: int = 0
    first_detection: int | None = None  # 1-based index of the first detected query
    success_at: int | None = None  # 1-based index of the first successful query
    adversarial: torch.Tensor | None = None  # [C, H, W] the successful query
    outcomes: Counter = field(default_factory=Counter)
    stages: Counter = field(default_factory=Counter)
    blocked: bool = False
    restarts: int = 0  # times the ART attack ended by itself and was started again

    def charge(self) -> None:
        if self.queries >= self.budget:
            raise BudgetExhausted
        self.queries += 1

    def is_detection(self, reply: Reply) -> bool:
        return reply.outcome == "blocked" or (reply.outcome == "rejected" and reply.stage in self.detection_stages)

    def record(self, x: torch.Tensor, reply: Reply) -> None:
        """``x`` ``[C, H, W]``: the query as sent; ``reply``: what came back (query already charged)."""
        self.outcomes[reply.outcome] += 1
        if reply.stage is not None and reply.refused:
            self.stages[reply.stage] += 1
        if self.is_detection(reply) and self.first_detection is None:
            self.first_detection = self.queries
        if reply.outcome == "blocked":
            self.blocked = True
        if (self.success_at is None and not reply.refused and int(np.argmax(reply.logits)) != self.y
                and float((x - self.x0).abs().max()) <= self.eps * (1 + 1e-5) + 1e-6):
            self.success_at = self.queries
            self.adversarial = x.detach().clone()

    def summary(self) -> dict[str, Any]:
        return {"queries": self.queries, "success_at": self.success_at, "first_detection": self.first_detection,
                "blocked": self.blocked, "restarts": self.restarts, "outcomes": dict(self.outcomes),
                "stages": dict(self.stages)}


@dataclass(frozen=True)
class Spacing:
    """Feng et al.'s query spacing: ``benign_per_query`` benign queries before each attack query
    (from ``benign`` ``[B, C, H, W]``, cycled), and ``wait_s`` seconds between attack queries."""

    benign: torch.Tensor
    benign_per_query: int = 1
    wait_s: float = 0.0


@dataclass(frozen=True)
class Transform:
    """Random transformation of each query: brightness shift in ``[-brightness, brightness]`` and
    uniform noise in ``[-noise, noise]``, projected into the eps-ball and [0, 1]; a rejected query
    is re-drawn up to ``resample`` times with the transform doubled each time."""

    brightness: float = 0.02
    noise: float = 0.02
    resample: int = 2


def identity_headers(n: int, header: str = "x-client-id", tokens: Sequence[str] | None = None,
                     prefix: str = "attacker") -> list[dict[str, str]]:
    """The gRPC metadata of ``n`` identities: a bearer token each (``tokens``, ``n`` of them) or
    ``{header: f"{prefix}-{i}"}``."""
    if tokens is not None:
        if len(tokens) < n:
            raise ValueError(f"identities: {n} identities need {n} bearer tokens, got {len(tokens)}")
        return [{"authorization": f"Bearer {t}"} for t in tokens[:n]]
    return [{header: f"{prefix}-{i}"} for i in range(n)]


class Attacker:
    """Sends an attack's queries for one image at a time: identities round-robin, spacing,
    transformations, and the ledger. ``oracles``: one :class:`GrpcOracle` per identity."""

    def __init__(self, oracles: Sequence[GrpcOracle], spacing: Spacing | None = None,
                 transform: Transform | None = None, on_block: str = "stop", seed: int = 0):
        if not oracles:
            raise ValueError("Attacker: need at least one oracle (identity)")
        if on_block not in ("stop", "continue"):
            raise ValueError(f"Attacker: on_block must be 'stop' or 'continue', got {on_block!r}")
        self.oracles, self.spacing, self.transform, self.on_block = list(oracles), spacing, transform, on_block
        self.gen = torch.Generator().manual_seed(seed)
        self.sent = 0  # every call made, spacing included
        self.benign_sent = 0
        self.benign_refused = 0
        self._next = 0
        self._benign_i = 0

    def _oracle(self) -> GrpcOracle:
        o = self.oracles[self._next % len(self.oracles)]
        self._next += 1
        return o

    def _transformed(self, x: torch.Tensor, x0: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
        t = self.transform
        shift = (torch.rand(1, generator=self.gen) * 2 - 1) * t.brightness * scale
        noise = (torch.rand(x.shape, generator=self.gen) * 2 - 1) * t.noise * scale
        return (x0 + (x + shift + noise - x0).clamp(-eps, eps)).clamp(0, 1)  # stays in the ball and the box

    def send(self, x: torch.Tensor, ledger: Ledger, transform: bool = True) -> Reply:
        """``x`` ``[C, H, W]`` one attack query -> the reply the attack sees (charged, recorded).
        ``transform=False``: sent as is (a starting point from another image, not a candidate)."""
        if ledger.blocked and self.on_block == "stop":
            raise ClientBlocked
        if ledger.queries >= ledger.budget:
            raise BudgetExhausted  # before the spacing queries: none are sent for a query that will not be
        oracle = self._oracle()
        if self.spacing is not None:
            sp = self.spacing
            for _ in range(sp.benign_per_query):
                b = sp.benign[self._benign_i % len(sp.benign)]
                self._benign_i += 1
                reply = oracle.ask(b)
                self.sent += 1
                self.benign_sent += 1
                if reply.refused:
                    self.benign_refused += 1
                if reply.outcome == "blocked" and ledger.first_detection is None:
                    ledger.first_detection = ledger.queries  # detected between attack queries
                    ledger.blocked = True
                    if self.on_block == "stop":
                        raise ClientBlocked
            if sp.wait_s > 0:
                time.sleep(sp.wait_s)
        moved = self.transform is not None and transform
        tries = 1 + (self.transform.resample if moved else 0)
        for attempt in range(tries):
            ledger.charge()
            q = self._transformed(x, ledger.x0, ledger.eps, 2.0 ** attempt) if moved else x
            reply = oracle.ask(q)
            self.sent += 1
            ledger.record(q, reply)
            if reply.outcome != "rejected":
                break
        return reply


def _art_classifier(attacker: Attacker, ledger: Ledger, shape: tuple[int, ...], classes: int, decision: bool):
    """The live endpoint as an ART black-box classifier for one image's attack. ``predict_fn``:
    ``[M, C, H, W]`` numpy -> ``[M, K]`` softmax scores (score-based) or one-hot labels
    (decision-based); a refused query answers the one-hot of the true label."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    refused_row = np.eye(classes, dtype=np.float32)[ledger.y]

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), classes), dtype=np.float32)
        for i, item in enumerate(batch):
            reply = attacker.send(torch.from_numpy(np.asarray(item, dtype=np.float32)), ledger)
            if ledger.success_at is not None:
                raise Succeeded
            if reply.refused:
                out[i] = refused_row
            elif decision:
                out[i] = np.eye(classes, dtype=np.float32)[int(np.argmax(reply.logits))]
            else:
                z = reply.logits.astype(np.float64)
                e = np.exp(z - z.max())
                out[i] = e / e.sum()
        return out

    return BlackBoxClassifierNeuralNetwork(predict_fn, input_shape=shape, nb_classes=classes, channels_first=True,
                                           clip_values=(0.0, 1.0))


def _starting_point(attacker: Attacker, ledger: Ledger, pool: torch.Tensor,
                    start: int) -> tuple[torch.Tensor | None, int]:
    """A decision-based attack's start: the first image of ``pool`` ``[B, C, H, W]`` from ``start``
    that the endpoint answers with a label other than ``ledger.y`` (each try is a charged query).
    -> (image ``[C, H, W]`` or None when the pool ran out, next start)."""
    for i in range(start, len(pool)):
        reply = attacker.send(pool[i], ledger, transform=False)
        if not reply.refused and int(np.argmax(reply.logits)) != ledger.y:
            return pool[i], i + 1
    return None, len(pool)


def run_query_attack(attack: str, attacker: Attacker, x0: torch.Tensor, y: int, eps: float, budget: int,
                     classes: int, detection_stages: frozenset[str], p_init: float = 0.3,
                     init_pool: torch.Tensor | None = None, seed: int = 0,
                     hsj_evals: tuple[int, int] = HSJ_EVALS) -> Ledger:
    """One image: ART ``attack`` ("square" or "hopskipjump") through ``attacker`` until success,
    the budget, or a block, restarting the attack when it gives up early (HopSkipJump finds no
    adversarial starting point, Square ends its iterations). ``x0`` ``[C, H, W]`` in [0, 1];
    ``init_pool`` ``[B, C, H, W]``: other images HopSkipJump may start from (its usual start, an
    image of another class; without it ART's own random-noise search, which a detector of noisy
    inputs refuses). ``seed`` seeds numpy's global generator, which ART draws from, for this
    image's attack only (the caller's generator state is restored). ``hsj_evals``: HopSkipJump's
    ``(init_eval, max_eval)``, the queries of its gradient estimate at the first iteration (growing
    with the square root of the iteration) and at most."""
    from art.attacks.evasion import HopSkipJump, SquareAttack

    ledger = Ledger(x0=x0, y=y, eps=eps, budget=budget, detection_stages=detection_stages)
    decision = attack == "hopskipjump"
    clf = _art_classifier(attacker, ledger, tuple(x0.shape), classes, decision)
    if attack == "square":
        art_attack = SquareAttack(clf, norm=np.inf, eps=eps, max_iter=budget, p_init=p_init, nb_restarts=1,
                                  batch_size=1, verbose=False)
    elif attack == "hopskipjump":
        art_attack = HopSkipJump(clf, norm=np.inf, max_iter=budget, max_eval=hsj_evals[1], init_eval=hsj_evals[0],
                                 init_size=100, batch_size=64, verbose=False)
    else:
        raise ValueError(f"unknown query attack {attack!r}; known: {QUERY_ATTACKS}")
    x = x0.numpy()[None].astype(np.float32)
    onehot = np.eye(classes, dtype=np.float32)[[y]]
    next_init = 0
    numpy_state = np.random.get_state()
    np.random.seed(seed)
    try:
        while True:
            before = ledger.queries
            kwargs = {}
            if decision and init_pool is not None:
                start, next_init = _starting_point(attacker, ledger, init_pool, next_init)
                if start is None:
                    break
                kwargs["x_adv_init"] = start.numpy()[None].astype(np.float32)
            art_attack.generate(x, y=onehot, **kwargs)
            ledger.restarts += 1
            if ledger.queries == before:  # the attack sent nothing: it would never end
                break
    except (BudgetExhausted, ClientBlocked, Succeeded):
        pass
    finally:
        np.random.set_state(numpy_state)
    return ledger


def run_transfer(surrogate: nn.Module, attacker: Attacker, x: torch.Tensor, y: torch.Tensor, eps: float,
                 detection_stages: frozenset[str], steps: int = 20) -> list[Ledger]:
    """Non-adaptive transfer: PGD (torchattacks, l-inf, ``steps`` steps of eps/4, random start) on
    ``surrogate`` (a torch model ``[N, C, H, W]`` -> ``[N, K]`` logits), each image sent once."""
    import torchattacks

    was_training = surrogate.training
    surrogate.eval()
    try:
        adv = torchattacks.PGD(surrogate, eps=eps, alpha=eps / 4, steps=steps, random_start=True)(x, y).detach()
    finally:
        surrogate.train(was_training)
    check_perturbation(adv, x, "linf", eps, who="transfer")
    ledgers = []
    for i in range(len(x)):
        ledger = Ledger(x0=x[i], y=int(y[i]), eps=eps, budget=1, detection_stages=detection_stages)
        try:
            attacker.send(adv[i], ledger)
        except ClientBlocked:
            pass
        ledgers.append(ledger)
    return ledgers


def cell_metrics(ledgers: Sequence[Ledger]) -> dict[str, Any]:
    """Per-cell metrics over the images' ledgers (see the module docstring)."""
    n = len(ledgers)
    succ = [lg for lg in ledgers if lg.success_at is not None]
    det = [lg for lg in ledgers if lg.first_detection is not None]
    before = [lg for lg in succ if lg.first_detection is None or lg.success_at < lg.first_detection]
    to_det = sorted(lg.first_detection for lg in det)
    return {
        "n": n,
        "robust_accuracy": 1.0 - len(succ) / n if n else None,
        "attack_success_rate": len(succ) / n if n else None,
        "detected_share": len(det) / n if n else None,
        "completed_before_detection_share": len(before) / n if n else None,
        "blocked_share": sum(lg.blocked for lg in ledgers) / n if n else None,
        "queries_to_first_detection_median": float(statistics.median(to_det)) if to_det else None,
        "queries_to_first_detection": to_det,
        "queries_to_success_median": float(statistics.median(lg.success_at for lg in succ)) if succ else None,
        "attack_queries": sum(lg.queries for lg in ledgers),
        "outcomes": dict(sum((lg.outcomes for lg in ledgers), Counter())),
        "rejections_by_stage": dict(sum((lg.stages for lg in ledgers), Counter())),
    }


@dataclass
class EndpointSettings:
    """What one endpoint evaluation runs. ``attacks``: names ``<attack>`` or ``<attack>-<adaptation>``
    (attack in :data:`QUERY_ATTACKS`, adaptation in :data:`ADAPTATIONS`) and ``transfer``;
    ``identity_header`` / ``tokens``: how identities are sent (tokens win when given)."""

    url: str
    model: str
    attacks: Sequence[str] = ("square", "hopskipjump", "square-spacing", "square-transform", "square-sybil",
                              "hopskipjump-sybil", "transfer")
    budgets: Sequence[int] = DEFAULT_BUDGETS
    eps: float = 0.1
    detection_stages: Sequence[str] = ("stateful",)
    identity_header: str = "x-client-id"
    tokens: Sequence[str] | None = None
    sybil_identities: int = 8
    benign_per_query: int = 1
    wait_s: float = 0.0
    transform: Transform = field(default_factory=Transform)
    on_block: str = "stop"
    p_init: float = 0.3
    hsj_evals: tuple[int, int] = HSJ_EVALS
    transfer_steps: int = 20
    seed: int = 0
    client_values: ClientValues | None = None  # the served model's clients normalize or speak BGR (GrpcOracle)
    channel: Channel | None = None  # TLS and a bearer token (GrpcOracle)

    def __post_init__(self):
        for name in self.attacks:
            base, _, adapt = name.partition("-")
            if name != "transfer" and (base not in QUERY_ATTACKS or (adapt and adapt not in ADAPTATIONS)):
                raise ValueError(f"attacks: unknown endpoint attack {name!r}; known: transfer, "
                                 f"{', '.join(QUERY_ATTACKS)} with optional -{'/-'.join(ADAPTATIONS)}")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets: need query budgets >= 1, got {list(self.budgets)}")
        if not self.eps > 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if self.sybil_identities < 1:
            raise ValueError(f"sybil_identities: must be >= 1, got {self.sybil_identities}")
        if len(self.hsj_evals) != 2 or not 1 <= self.hsj_evals[0] <= self.hsj_evals[1]:
            raise ValueError(f"hsj_evals: need (init_eval, max_eval) with 1 <= init_eval <= max_eval, "
                             f"got {tuple(self.hsj_evals)}")


def _attacker(s: EndpointSettings, adapt: str, benign: torch.Tensor, item_seed: int, cell: str = "") -> Attacker:
    """A fresh attacker for one image: new identities per image (one attack campaign per image)
    and per cell (``cell``: e.g. ``square-sybil@5000``; a client blocked in one cell would
    otherwise be met, still blocked, by the next cell's attack on the same image)."""
    n_ids = s.sybil_identities if adapt == "sybil" else 1
    headers = identity_headers(n_ids, s.identity_header, s.tokens, prefix=f"attacker{item_seed}{cell}")
    oracles = [GrpcOracle(s.url, s.model, headers=h, client_values=s.client_values, channel=s.channel)
               for h in headers]
    spacing = Spacing(benign, s.benign_per_query, s.wait_s) if adapt == "spacing" else None
    transform = s.transform if adapt == "transform" else None
    return Attacker(oracles, spacing, transform, on_block=s.on_block, seed=item_seed)


def run_cell(s: EndpointSettings, name: str, budget: int, x: torch.Tensor, y: torch.Tensor, benign: torch.Tensor,
             classes: int, surrogate: nn.Module | None = None, progress: bool = True) -> dict[str, Any]:
    """One (attack, budget) cell over images ``x`` ``[N, C, H, W]``, ``y`` ``[N]``."""
    base, _, adapt = name.partition("-")
    adapt = adapt or "plain"
    stages = frozenset(s.detection_stages)
    t0 = time.perf_counter()
    ledgers, sent, benign_sent = [], 0, 0
    if name == "transfer":
        if surrogate is None:
            raise ValueError("the transfer attack needs a surrogate model")
        attacker = _attacker(s, "plain", benign, s.seed, cell=f"-{name}")
        try:
            ledgers = run_transfer(surrogate, attacker, x, y, s.eps, stages, steps=s.transfer_steps)
        finally:
            for o in attacker.oracles:
                o.close()
        sent = attacker.sent
        n_ids = 1
    else:
        n_ids = s.sybil_identities if adapt == "sybil" else 1
        for i in tqdm(range(len(x)), desc=f"{name} q={budget}", disable=not progress, leave=False):
            item_seed = s.seed * 100003 + i
            attacker = _attacker(s, adapt, benign, item_seed, cell=f"-{name}@{budget}")
            try:
                ledgers.append(run_query_attack(base, attacker, x[i], int(y[i]), s.eps, budget, classes, stages,
                                                p_init=s.p_init, init_pool=benign, seed=item_seed,
                                                hsj_evals=tuple(s.hsj_evals)))
            finally:
                for o in attacker.oracles:
                    o.close()
            sent += sum(o.queries for o in attacker.oracles)
            benign_sent += attacker.benign_sent
    metrics = cell_metrics(ledgers)
    # exact accounting: every call the oracles answered is an attack query or a spacing query
    if sent != metrics["attack_queries"] + benign_sent:
        raise AssertionError(f"{name}: oracles answered {sent} calls, ledgers hold {metrics['attack_queries']} "
                             f"+ {benign_sent} spacing queries")
    metrics["benign_spacing_queries"] = benign_sent
    adv = [lg.adversarial for lg in ledgers if lg.adversarial is not None]
    if adv:
        idx = [i for i, lg in enumerate(ledgers) if lg.adversarial is not None]
        check_perturbation(torch.stack(adv), x[idx], "linf", s.eps, who=name)
    tm = ThreatModel(attack=name, norm="linf", eps=s.eps, steps=s.transfer_steps if name == "transfer" else budget,
                     target="endpoint", queries=1 if name == "transfer" else budget, n=len(x))
    threat = {**tm.as_dict(), "identities": n_ids, "adaptation": "transfer" if name == "transfer" else adapt,
              "answers_seen": "label" if base == "hopskipjump" else "scores",
              "detection_stages": sorted(stages), "on_block": s.on_block}
    if adapt == "spacing":
        threat["spacing"] = {"benign_per_query": s.benign_per_query, "wait_s": s.wait_s}
    if adapt == "transform":
        threat["transform"] = asdict(s.transform)
    if base == "hopskipjump":
        threat["hsj_evals"] = {"init_eval": s.hsj_evals[0], "max_eval": s.hsj_evals[1]}
    elif base == "square":
        threat["p_init"] = s.p_init
    return {"attack": name, "budget": budget, "eps": s.eps, "threat_model": threat, "metrics": metrics,
            "items": [lg.summary() for lg in ledgers], "wall_seconds": time.perf_counter() - t0, "status": "done"}


def cells(settings: EndpointSettings) -> Iterator[tuple[str, int]]:
    """(attack, budget) pairs; the transfer attack sends one query per image, so it runs once."""
    for name in settings.attacks:
        if name == "transfer":
            yield name, 1
        else:
            for b in settings.budgets:
                yield name, b


def run_endpoint_matrix(settings: EndpointSettings, x: torch.Tensor, y: torch.Tensor, classes: int,
                        benign: torch.Tensor, surrogate: nn.Module | None = None, benign_streams: bool = True,
                        benign_clients: int = 10, out: str | None = None, command: str = "",
                        progress: bool = True, on_cell: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every cell of :func:`cells` on images ``x`` ``[N, C, H, W]`` / ``y`` ``[N]``, plus the benign
    streams over ``benign`` ``[B, C, H, W]`` (images the attacker does not attack: the spacing pool
    and the benign clients' traffic). Writes results.json / results.md under ``out`` when given."""
    from robustgate.attacks.benign import run_benign_streams
    from robustgate.attacks.endpoint_reports import write_endpoint_reports

    result: dict[str, Any] = {"url": settings.url, "model": settings.model, "n": len(x), "command": command,
                              "settings": {**{k: v for k, v in asdict(settings).items()
                                              if k not in ("tokens", "channel")},  # never a token
                                           "channel": None if settings.channel is None
                                           else settings.channel.describe()},
                              "cells": []}
    for name, budget in cells(settings):
        if name == "transfer" and surrogate is None:
            result["cells"].append({"attack": name, "budget": 1, "eps": settings.eps, "status": "skipped",
                                    "reason": "no surrogate model given"})
            continue
        cell = run_cell(settings, name, budget, x, y, benign, classes, surrogate, progress)
        result["cells"].append(cell)
        if on_cell is not None:
            on_cell(cell)
    if benign_streams:
        result["benign"] = run_benign_streams(settings.url, settings.model, benign, clients=benign_clients,
                                              detection_stages=settings.detection_stages,
                                              identity_header=settings.identity_header, seed=settings.seed,
                                              progress=progress, client_values=settings.client_values,
                                              channel=settings.channel)
    if out is not None:
        write_endpoint_reports(result, out)
    return result
