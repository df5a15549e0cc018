"""A learned similarity encoder with k-nearest-neighbour scoring of each client's queries (Chen,
Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks", SPAI 2020).

A query-based attack (Square, HopSkipJump, NES, ...) sends queries that all lie in a small ball
around one image; Blacklight's content hashes (defenses/stateful/blacklight.py) only match two
queries that share many exact pixel windows, which Square's early, large squares destroy. Here a
small CNN ``e`` is trained so that two images inside one l-inf ball embed close, and different
pictures far apart; a query is attack-like when its ``k`` nearest earlier queries of the same
client are all close:

1. encode: pixels scaled to [0, 1], average-pooled to at most ``max_side`` pixels a side (images larger
   than that only: 224x224 by 4, to 56x56) -> ``e(x)`` ``[d]`` (ONNX Runtime: in the backbone's fused
   pass when the proxy fuses it, ``onnx_embedding_model``, else in a session of one intra-op thread),
   stored as float32 with a keyed digest of the raw input (exact retries);
2. score: from the l2 distances of ``e(x)`` to its ``k`` nearest earlier (non-retry) queries of the
   client (defenses/stateful/knn_store.py), ``D`` = the distance to the ``k``-th nearest
   (``statistic: kth``, the default) or their mean (``statistic: mean``, the paper's), reported as
   ``1 / (1 + D)`` in ``(0, 1]`` so that higher = more attack-like, as every detector's; flagged when
   ``score > threshold`` (the threshold calibrated on benign streams, defenses.stateful.calibration).
   A query with fewer than ``k`` earlier queries, and an exact retry, score 0 (never flagged).

``window`` (default 256; None: the whole history): the ``k`` nearest are sought among the client's
last ``window`` remembered queries (retries are still recognised over all of them). Against a longer
history a benign query finds ``k`` lookalikes more often (distinct Fashion-MNIST test images, with the
whole history: flagged on 0.15% of queries between the 1,000th and 1,500th, 1.30% between the 2,000th and
2,500th; bench/results/stateful.long_streams.md), which the window keeps at the calibrated rate. The threshold
(``robustgate fit``, defenses/cli.py) is calibrated on two kinds of benign client, and the larger of
the two kinds' thresholds is kept: clients of about 100 images each (10% sent again, 10% followed by
``k - 1`` near-copies), and clients that follow every image with ``k - 1`` near-copies, 400 queries
each at ``k = 4``, longer than the window: for the last copy of an image only one other picture within
the threshold makes ``k`` neighbours, so those clients set the threshold. An attack's queries are
consecutive, so its nearest are its own last ones either way; the spacing attacker needs about
``window / (k - 1)`` other queries between two of its own to keep fewer than ``k`` in a window.

``k`` is what a benign client may do: it may send up to ``k - 1`` near-copies of one image (crops,
brightness, re-encodings) within the history's TTL without being flagged, because the ``k``-th
neighbour of the last copy is another picture; an attack is flagged from its ``(k+1)``-th query on.
The ``kth`` statistic keeps that promise by construction; the mean of ``k - 1`` near-zero distances
and one far one can fall below an attack's (whose queries lie up to ``2 eps`` apart, farther than a
JPEG re-encoding), so with ``mean`` the threshold the benign near-copies force lets attacks run
longer. Symbols: ``d`` = ``dim``, ``m`` = ``margin``.

``max_side`` (default 64): the encoder sees an image larger than that average-pooled by
``ceil(max(H, W) / max_side)`` (:func:`pool_factor`; part of its graph, so the proxy's fused pass and
``fit`` see the same), and 28x28 or 32x32 images as they are. At full resolution its convolutions
grow with the pixels: at 3x224x224 (``width`` 32) they cost ~184 M multiply-adds per image, 16 times those at 56x56,
and a standard-trained model of that size may itself need no more than a few hundred million (a
MobileNet). Telling near-copies of one picture from other pictures needs no finer detail. Pooling is
linear, so a perturbation inside an l-inf ball of ``eps`` stays inside it once pooled (and random
signs average out): the queries of an attack look no less alike to the encoder than at full
resolution.

``width`` (default 16; 32 before 2026-12-06): the first convolution's filters (the others have twice
as many). The encoder runs for every served item, in the backbone's fused pass; at width 16 it costs a
quarter of width 32's multiply-adds (~0.7 M against ~2.8 M at 28x28), and on the endpoint red team's
model it detects Square and HopSkipJump as early (docs/EVALUATION.md; the stage's cost:
bench/results/defenses.proxy_cost.stateful.md).

Training (``fit``, the paper's contrastive loss, Hadsell et al. 2006 with the margin on squared
distances; ``steps`` 6,000 of ``batch_size`` 128): two views of each training image, each an
attack-like perturbation inside an l-inf ball of radius ``U(0, eps)`` (uniform, sign, Square-like
stripes and squares, small Gaussian noise), after a benign edit (brightness, 1-2 px crop, JPEG) with
probability ``p_benign`` (default 0). Benign edits as positives (``p_benign`` 0.2 and 3,000 steps,
the defaults before) pull a client's near-copies of one picture together, and with them the other
pictures that look alike: the threshold the near-copy clients force is then higher, and attacks are
detected later (docs/EVALUATION.md); the transformation-adaptive attacker of Feng et al. (CCS 2023)
they were meant to slow is measured there too; loss over a batch of ``B``
images = mean over positive pairs (two views of one image) of ``||e_i - e_j||^2`` + mean over
negative pairs (views of two images) still inside the margin of ``max(0, m^2 - ||e_i - e_j||^2)``
(the paper averages over all negative pairs; most are far apart after a few steps, and averaging
over them dilutes the few similar pictures the detector must tell apart from an attack's queries).

Known limits: as Blacklight's, a per-client history is evaded by spacing queries beyond its bounds
or spreading them over identities (Sybil); an attack that succeeds within its first ``k`` queries
is never seen; perturbations larger than the training ``eps`` (or edits unlike the training
transforms) may embed far apart; the encoder is a network, so a white-box attacker holding it
could search for perturbations that move the embedding (its weights stay in the bundle, never sent).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustgate.defenses.base import FitData
from robustgate.defenses.stateful.base import StatefulDetector
from robustgate.defenses.stateful.blacklight import digest_kernel, digests
from robustgate.defenses.stateful.knn_store import KnnMemoryStore
from robustgate.defenses.stateful.store import HistoryStore


def pool_factor(height: int, width: int, max_side: int) -> int:
    """The average-pooling factor that brings an ``height x width`` image to at most ``max_side``
    pixels on its longer side: ``ceil(max(height, width) / max_side)`` (1: none)."""
    return max(1, -(-max(height, width) // max_side))


class Encoder(nn.Module):
    """``[N, C, H, W]`` in [0, 1] -> ``[N, dim]``: average pooling by ``pool`` (``pool x pool`` windows,
    stride ``pool``; none for 1), three 3x3 conv layers (the first two with stride 2), global average
    pooling (any H, W) and a linear map."""

    def __init__(self, channels: int, width: int = 32, dim: int = 32, pool: int = 1):
        super().__init__()
        self.pool = pool
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(),  # [N, w, H/2, W/2]
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # [N, 2w, H/4, W/4]
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())  # [N, 2w, H/4, W/4]
        self.head = nn.Linear(2 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)  # [N, C, H / pool, W / pool] (floor)
        return self.head(self.features(x).mean(dim=(2, 3)))  # [N, dim]


# ---- training views (pure tensor functions) --------------------------------------------------------
def attack_delta(x: torch.Tensor, eps: float, g: torch.Generator, squares: int = 3) -> torch.Tensor:
    """A perturbation ``[N, C, H, W]`` like a query attack's, each item inside its own l-inf ball of
    radius ``r ~ U(0, eps)``: uniform noise, sign noise, Square-like (+-r vertical stripes, then
    ``squares`` squares of side 1..H/2 set to +-r per channel; Andriushchenko et al. 2020's init and
    steps) or Gaussian noise of std ``r / 3`` clipped to ``[-r, r]``, the kind drawn per item."""
    n, c, h, w = x.shape
    r = eps * torch.rand(n, 1, 1, 1, generator=g)  # [N, 1, 1, 1]

    def sign(*shape: int) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=g).float() * 2 - 1

    uniform = (torch.rand(x.shape, generator=g) * 2 - 1) * r
    signs = sign(n, c, h, w) * r
    square = sign(n, c, 1, w).expand(n, c, h, w)  # [N, C, H, W] stripes
    rows, cols = torch.arange(h).view(1, 1, h, 1), torch.arange(w).view(1, 1, 1, w)
    for _ in range(squares):  # each item's square j: side s, corner (top, left), one sign per channel
        side = torch.randint(1, max(2, h // 2 + 1), (n, 1, 1, 1), generator=g)
        top = (torch.rand(n, 1, 1, 1, generator=g) * (h - side + 1)).long()
        left = (torch.rand(n, 1, 1, 1, generator=g) * (w - side + 1)).long()
        inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)  # [N, 1, H, W]
        square = torch.where(inside, sign(n, c, 1, 1), square)
    square = square * r
    gauss = torch.maximum(torch.minimum(torch.randn(x.shape, generator=g) * r / 3, r), -r)  # kept in the ball
    kind = torch.randint(0, 4, (n, 1, 1, 1), generator=g)
    return torch.where(kind == 0, uniform, torch.where(kind == 1, signs, torch.where(kind == 2, square, gauss)))


def benign_edit(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each item of ``x`` ``[N, C, H, W]`` in [0, 1] edited as a real client's near-duplicate (the kinds
    of defenses.stateful.calibration.near_duplicate): brightness x ``U(0.9, 1.1)``, a crop of 0-2
    pixels per side resized back, or a JPEG re-encoding (quality 70-95, one per call; C = 1 or 3)."""
    from robustgate.defenses.purify.jpeg import jpeg_roundtrip
    from robustgate.defenses.stateful.calibration import near_duplicate

    kinds = 3 if x.shape[1] in (1, 3) else 2
    kind = torch.randint(0, kinds, (x.shape[0],), generator=g)
    out = (x * (0.9 + 0.2 * torch.rand(x.shape[0], 1, 1, 1, generator=g))).clamp(0, 1)  # brightness
    for i in torch.nonzero(kind == 1).flatten().tolist():
        out[i] = near_duplicate(x[i], "crop", g)
    jpeg = torch.nonzero(kind == 2).flatten()
    if jpeg.numel():
        out[jpeg] = jpeg_roundtrip(x[jpeg], int(torch.randint(70, 96, (), generator=g)))  # one batched codec call
    return out


def view(x: torch.Tensor, eps: float, p_benign: float, p_attack: float, g: torch.Generator) -> torch.Tensor:
    """One random training view of ``x`` ``[N, C, H, W]`` in [0, 1]: with probability ``p_benign`` a
    :func:`benign_edit`, then with probability ``p_attack`` an :func:`attack_delta`; clipped to [0, 1]."""
    edited = (torch.rand(x.shape[0], 1, 1, 1, generator=g) < p_benign).float()
    attacked = (torch.rand(x.shape[0], 1, 1, 1, generator=g) < p_attack).float()
    out = x + edited * (benign_edit(x, g) - x)
    return (out + attacked * attack_delta(x, eps, g)).clamp(0, 1)


def contrastive_loss(e1: torch.Tensor, e2: torch.Tensor, margin: float) -> torch.Tensor:
    """The two views' embeddings ``[B, d]`` x2 -> the loss of the module docstring: positives are
    ``(e1[i], e2[i])``, negatives every pair of views of two different images."""
    b = e1.shape[0]
    e = torch.cat([e1, e2])  # [2B, d]
    d2 = torch.cdist(e, e).pow(2)  # [2B, 2B]
    image = torch.arange(2 * b, device=e.device) % b
    same = image[:, None] == image[None, :]
    pos = same & ~torch.eye(2 * b, dtype=torch.bool, device=e.device)
    hinge = F.relu(margin ** 2 - d2[~same])  # [pairs of views of two images]
    active = (hinge > 0).sum().clamp_min(1)  # the mean over the pairs still inside the margin: the
    return d2[pos].mean() + hinge.sum() / active  # similar pictures, not diluted by the easy majority


def train_encoder(enc: Encoder, x: torch.Tensor, *, steps: int, batch_size: int, lr: float, margin: float,
                  eps: float, p_benign: float, p_attack: float, seed: int, progress: bool = False,
                  device: str | torch.device = "cpu") -> list[float]:
    """Trains ``enc`` on images ``x`` ``[N, C, H, W]`` in [0, 1] (module docstring); returns the mean
    loss per 100 steps. ``progress``: a tqdm bar (stderr). ``device``: where ``enc`` trains (the
    views are drawn on the host: JPEG and crops run there); ``enc`` ends on the CPU."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc.to(device)
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    enc.train()
    history, window = [], []
    with tqdm(total=steps, desc="knn encoder", unit="step", disable=not progress, leave=False) as bar:
        for step in range(steps):
            xb = x[torch.randint(0, x.shape[0], (batch_size,), generator=g)]
            v1, v2 = view(xb, eps, p_benign, p_attack, g), view(xb, eps, p_benign, p_attack, g)
            loss = contrastive_loss(enc(v1.to(device)), enc(v2.to(device)), margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            window.append(loss.item())
            if len(window) == 100 or step == steps - 1:
                history.append(float(np.mean(window)))
                window = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    enc.eval().to("cpu")
    return history


def unit_scaled_graph(model: "onnx.ModelProto", value_range: tuple[float, float]) -> "onnx.ModelProto":
    """``model`` (one input ``[N, C, H, W]`` in [0, 1]) reading raw pixels in ``value_range`` instead:
    ``(x - lo) / (hi - lo)`` in float32 before its first node, as :meth:`KnnDetector.embed` scales in
    torch (the same two IEEE operations, so the same values); unchanged (a copy) for [0, 1]."""
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    lo, hi = (float(v) for v in value_range)
    if (lo, hi) == (0.0, 1.0):
        return out
    g = out.graph
    raw = g.input[0].name
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    shifted, unit, lo_name, span_name = (next(f"{b}_{i}" for i in range(len(taken) + 1) if f"{b}_{i}" not in taken)
                                         for b in ("unit_shifted", "unit_x", "unit_lo", "unit_span"))
    for node in g.node:  # every reader of the raw input reads the scaled one
        node.input[:] = [unit if n == raw else n for n in node.input]
    g.initializer.extend([helper.make_tensor(lo_name, TensorProto.FLOAT, [], [lo]),
                          helper.make_tensor(span_name, TensorProto.FLOAT, [], [hi - lo])])
    scale = [helper.make_node("Sub", [raw, lo_name], [shifted]), helper.make_node("Div", [shifted, span_name], [unit])]
    nodes = scale + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


STATISTICS = ("mean", "kth")


def knn_scores(dist: np.ndarray, statistic: str = "kth") -> np.ndarray:
    """``[N, k]`` distances to the k nearest, ascending (``inf`` where missing) -> ``[N]`` float32 scores
    ``1 / (1 + D)`` with ``D`` their mean (``statistic="mean"``, the paper's) or the k-th, the largest
    (``"kth"``); 0 for a row with a missing neighbour (too little history, or a retry)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    d = dist.mean(axis=1, dtype=np.float32) if statistic == "mean" else dist[:, -1]  # inf for a row with a missing one
    return (1.0 / (1.0 + d)).astype(np.float32, copy=False)  # 1 / (1 + inf) = 0 exactly


class KnnDetector(StatefulDetector):
    """k-NN over a learned embedding (module docstring). ``observe(client, x [N, C, H, W])`` -> ``[N]``
    float32 scores in ``[0, 1]``; 0 for an exact retry or fewer than ``k`` earlier queries."""

    kind: ClassVar[str] = "knn"
    needs_artifacts: ClassVar[bool] = True
    host_only: ClassVar[str] = ("searches its history on the host (numpy); its encoder runs in the backbone's fused "
                                "ONNX pass when the pipeline has one, else in an ONNX Runtime CPU session")  # defenses/assemble.py

    def __init__(self, k: int = 4, dim: int = 32, width: int = 16, steps: int = 6000, batch_size: int = 128,
                 lr: float = 2e-3, margin: float = 1.0, eps: float = 0.1, p_benign: float = 0.0,
                 p_attack: float = 1.0, seed: int = 0, statistic: str = "kth", max_side: int = 64,
                 window: int | None = 256, threshold: float | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), store: HistoryStore | None = None):
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        for name, value in (("k", k), ("dim", dim), ("width", width), ("steps", steps), ("batch_size", batch_size),
                            ("max_side", max_side)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (negatives are other images), got {batch_size}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < k):
            raise ValueError(f"window must be an integer >= k ({k}) or null (the whole history), got {window!r}")
        for name, value, hi in (("lr", lr, None), ("margin", margin, None), ("eps", eps, 1.0),
                                ("p_benign", p_benign, 1.0), ("p_attack", p_attack, 1.0)):
            if not isinstance(value, (int, float)) or value < 0 or (hi is not None and value > hi):
                raise ValueError(f"{name} must be a number in [0, {hi or 'inf'}], got {value!r}")
        self.k, self.dim, self.width, self.steps, self.batch_size = k, dim, width, steps, batch_size
        self.lr, self.margin, self.eps = float(lr), float(margin), float(eps)
        self.p_benign, self.p_attack, self.seed = float(p_benign), float(p_attack), int(seed)
        self.statistic, self.max_side, self.window = statistic, max_side, window
        super().__init__(threshold=threshold, value_range=value_range, store=store)
        if getattr(self.store, "holds", None) != "embeddings":
            raise ValueError(f"{self.kind}: store must hold embeddings (KnnMemoryStore, or a shared one of its "
                             f"kind), got {type(self.store).__name__}")
        digest_kernel(), digest_kernel(release_gil=True)  # compiled (or loaded from numba's cache) now
        self.encoder: Encoder | None = None
        self.history: list[float] = []
        self._session = None
        self._encoder_path: Path | None = None  # encoder.onnx, once loaded (onnx_embedding_model)

    def default_store(self) -> HistoryStore:
        return KnnMemoryStore()

    def private_store(self, **bounds) -> HistoryStore:
        return KnnMemoryStore(**bounds)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.value_range
        return (x.float() - lo) / (hi - lo)

    # ---- offline ----
    def fit(self, data: FitData, classifier=None) -> None:
        x = self._unit(data.train_x.cpu())
        self.encoder = Encoder(x.shape[1], self.width, self.dim, pool_factor(*x.shape[-2:], self.max_side))
        self.history = train_encoder(self.encoder, x, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                     margin=self.margin, eps=self.eps, p_benign=self.p_benign,
                                     p_attack=self.p_attack, seed=self.seed, progress=data.progress,
                                     device=data.device)
        self._item_shape = tuple(x.shape[1:])
        self.fit_report = {"loss": self.history}  # mean contrastive loss per 100 steps (bundle.yaml)

    def save(self, directory: Path) -> dict[str, str]:
        """Writes ``encoder.onnx`` (batch axis dynamic, the item shape fixed) into ``directory``."""
        from robustgate.defenses.runtime import export_onnx

        if self.encoder is None:
            raise ValueError(f"{self.kind}: nothing to save; fit the encoder first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        export_onnx(self.encoder, torch.zeros(1, *self._item_shape), directory / "encoder.onnx", output_name="embedding")
        self.load_artifacts({"encoder_onnx": directory / "encoder.onnx"})
        return {"encoder_onnx": "encoder.onnx"}

    def load_artifacts(self, files: dict[str, Path]) -> None:
        from robustgate.defenses.runtime import OnnxModel

        if set(files) != {"encoder_onnx"}:
            raise ValueError(f"{self.kind}: expected the artifact encoder_onnx, got {sorted(files)}")
        session = OnnxModel(files["encoder_onnx"], threads=1, spin=False)
        self._encoder_path = Path(files["encoder_onnx"])
        out = session.session.get_outputs()[0].shape
        if out[-1] != self.dim:
            raise ValueError(f"{self.kind}: {files['encoder_onnx']} embeds in {out[-1]} dimensions, dim is {self.dim}")
        self._session = session
        self._item_shape = tuple(int(d) for d in session.session.get_inputs()[0].shape[1:])

    # ---- online ----
    def embed(self, x: torch.Tensor) -> np.ndarray:
        """``[N, C, H, W]`` in ``value_range`` -> ``[N, dim]`` float32 embeddings (ONNX Runtime)."""
        if self._session is None:
            raise ValueError(f"{self.kind}: no encoder loaded; fit it first (robustgate fit --defense stateful "
                             f"--params method=knn)")
        if tuple(x.shape[1:]) != self._item_shape:
            raise ValueError(f"{self.kind}: input items have shape {tuple(x.shape[1:])}, the encoder was fitted for "
                             f"{self._item_shape}")
        return self._session.run_numpy(self._unit(x).numpy())

    def _encode(self, x: torch.Tensor) -> tuple[np.ndarray, ...]:
        return digests(x, self.store.fingerprint_key()), self.embed(x)

    def onnx_embedding_model(self):
        """``encoder.onnx`` reading raw pixels in ``value_range`` (the scaling to [0, 1] of
        :meth:`embed` prepended as ``Sub``/``Div`` nodes when the range is not [0, 1]): ``[N, C, H, W]``
        -> ``[N, dim]``, fused into the backbone's session by the proxy (StatefulDetector.onnx_embedding_model).
        None before an encoder is loaded."""
        if self._encoder_path is None:
            return None
        import onnx

        return unit_scaled_graph(onnx.load(str(self._encoder_path)), self.value_range)

    def _encode_embedded(self, x: torch.Tensor, embedding: np.ndarray) -> tuple[np.ndarray, ...]:
        emb = np.asarray(embedding)
        if emb.shape != (x.shape[0], self.dim):
            raise ValueError(f"{self.kind}: embedding must be [{x.shape[0]}, {self.dim}], got {emb.shape}")
        return digests(x, self.store.fingerprint_key()), emb

    def _observe_groups(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None) -> list[torch.Tensor]:
        dists = self.store.observe_batch([(client, d, e) for client, (d, e) in groups], self.k, now, self.window)
        return [torch.from_numpy(knn_scores(dist, self.statistic)) for dist in dists]

    def _observe_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]], now: float | None) -> np.ndarray:
        return self._row_scores(self.store.observe_batch([(client, d, e) for client, (d, e) in groups], self.k, now,
                                                         self.window))

    def _observe_live_rows(self, groups: list[tuple[str, tuple[np.ndarray, ...]]],
                           now: float) -> tuple[list[float | None], np.ndarray]:
        ends, dists = self.store.observe_unblocked([(client, d, e) for client, (d, e) in groups], now, k=self.k,
                                                   window=self.window)
        return ends, self._row_scores([d for d in dists if d is not None])

    def _row_scores(self, dists: list[np.ndarray]) -> np.ndarray:
        """The store's ``[N_c, k]`` distances per group -> ``[sum N_c]`` float32 scores."""
        if not dists:
            return np.zeros(0, dtype=np.float32)
        return knn_scores(dists[0] if len(dists) == 1 else np.concatenate(dists), self.statistic)  # row-wise: one call
