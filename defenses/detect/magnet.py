"""MagNet: detector autoencoders and the reformer (Meng & Chen, "MagNet: a Two-Pronged Defense
against Adversarial Examples", CCS 2017).

An autoencoder ``AE`` is trained on clean training images only, with noise regularization
(input ``clip(x + v * N(0, 1))``, target ``x``, MSE, small L2 weight decay), so that it learns the
manifold of clean data. Then:

- **detectors** score how far ``x`` is from that manifold:
  - ``criterion="l1"`` / ``"l2"``: reconstruction error ``||x - AE(x)||_p`` (per item, over
    all pixels; the paper's MNIST detectors are L2 on autoencoder I and L1 on autoencoder II);
  - ``criterion="jsd"``: Jensen-Shannon divergence between ``softmax(f(x) / T)`` and
    ``softmax(f(AE(x)) / T)`` for the bundle's classifier ``f`` (passed to ``score`` as
    ``classifier``), at a temperature ``T`` such as 10 or 40 (the paper's CIFAR detectors);
- the **reformer** (:class:`MagNetReformer`, purifier kind ``"reformer"``) classifies
  ``AE(x)`` instead of ``x``, pulling near-manifold adversarials back.

Mapping to pipeline stages: one :class:`MagNet` detector stage per criterion, each with its own
autoencoder, artifacts and threshold, e.g. stages ``magnet_l2`` (criterion l2, arch I),
``magnet_l1`` (l1, arch II), ``magnet_jsd10`` (jsd, T=10). A request passing MagNet passes every
MagNet stage (the paper's "any detector fires -> reject"); each stage is calibrated on its own,
so the union of k stages has a clean FPR of at most k times the per-stage target.

Any input: the autoencoders are sized to the images they are fitted on -- their first and last
convolutions to the channels, the down-sampling stages of autoencoders I and III to the resolution
(``downsample="auto"``: the bottleneck near 14 pixels a side as the paper's 28 -> 14, so 1 stage at
28x28 and 32x32, 4 at 224x224), and any height and width is padded to what those stages need and
cropped back. At [1, 28, 28] they are exactly the layers of the first 28x28-only version, so
bundles fitted then (bundles/default) load unchanged (a regression test checks the scores).
Large images: the detector's default ``arch="auto"`` is autoencoder II up to about 80 pixels a side
and autoencoder IV above (:func:`resolve_arch`): II's full-resolution convolutions cost a large
share of a ResNet-50's forward at 224x224, IV folds the image into channels (pixel-unshuffle to a
side near 56) and runs II's three convolutions there (bench/results/byo.magnet_cost.md). A bundle
records the ``arch`` it was fitted with, so a recorded architecture loads as it was fitted.

Runtimes: ``fit`` writes the autoencoder as ONNX (``ae.onnx``, what the proxy runs in ONNX
Runtime on a CPU device unless the stage's params say ``runtime: torch``: :meth:`MagNet.served_runtime`)
and as a safetensors state dict (``ae.safetensors``, the torch twin). ``runtime="torch"`` (the
constructor's default, what ``fit`` records and the red team attacks) keeps the autograd graph:
``score`` is differentiable in ``x`` (through the classifier too, for ``jsd``, when the
classifier is a differentiable torch view), which is what an adaptive attack needs to drive the
score under the threshold. A parity test checks both runtimes give the same scores. With
``runtime: onnx`` and criterion l1 or l2, ``onnx_score_model`` gives ``ae.onnx`` extended with the
error itself, which the proxy fuses into the backbone's session (proxy/backends/fuse.py).

Known limit: MagNet is not robust to adaptive attacks. Carlini & Wagner ("MagNet and 'Efficient
Defenses Against Adversarial Attacks' are Not Robust to Adversarial Examples", 2017) break it
with attacks that optimize against the detectors and reformer jointly (and, for the paper's
randomized "graybox" variant, against an ensemble of autoencoders). Report its detection rates
against non-adaptive attacks as such.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustgate.defenses.base import Classifier, FitData, Detector, Purifier, check_images, register
import numpy as np
import onnxruntime as ort

from robustgate.defenses.runtime import check_runtime, export_onnx, load_weights, save_weights

ARCHS = ("I", "II", "III", "IV")
AUTO_ARCH_SIDE = 80  # arch "auto": II below this many pixels a side, IV from it (resolve_arch)
# ONNX Runtime graph optimization levels. "all" adds layout transforms (NCHWc) that speed up wide
# convolutions; for an autoencoder of a few channels at full resolution they cost more than they
# save (measured, batch 64, 1 thread: width 4 ~2.3x faster with "extended", width 32 ~1.8x slower;
# bench/results/detect.md).
ORT_OPTIMIZATION = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
ACTIVATIONS = ("sigmoid", "relu")
CRITERIA = ("l1", "l2", "jsd")


# ---- the autoencoders: the paper's MNIST ones (Meng & Chen 2017, Table 1), sized to the input -----
class Autoencoder(nn.Sequential):
    """A MagNet autoencoder: ``[N, C, H, W]`` -> ``[N, C, H, W]`` in ``[0, 1]``. Its layers are
    the ``nn.Sequential`` (state-dict keys ``0.weight`` ...); ``forward`` pads the input (replicate)
    to a multiple of ``2**downsample`` -- what its down-sampling stages need -- and crops the output
    back, so every height and width works. An input that already fits is not padded."""

    def __init__(self, *layers: nn.Module, downsample: int = 0):
        super().__init__(*layers)
        self.multiple = 2 ** downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if not (ph or pw):  # nothing to pad or crop (the exported graph is then the plain layers)
            return super().forward(x)
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")  # [N, C, H', W'], H' and W' multiples
        return super().forward(x)[..., :h, :w]  # [N, C, H, W]


def resolve_arch(arch: str, item_shape: tuple[int, ...]) -> str:
    """The autoencoder for items ``(C, H, W)``: ``arch`` itself, or for ``"auto"`` II when the
    smaller side is under ``AUTO_ARCH_SIDE`` pixels (28x28, 32x32, 64x64: II as fitted before
    ``auto`` existed) and IV from there on (II's full-resolution work grows with the pixel count)."""
    if arch != "auto":
        return arch
    return "II" if min(int(s) for s in item_shape[-2:]) < AUTO_ARCH_SIDE else "IV"


def resolve_downsample(arch: str, downsample: int | str, item_shape: tuple[int, ...]) -> int:
    """The number of 2x down-sampling stages of autoencoder ``arch`` (resolved, not ``"auto"``)
    for items ``(C, H, W)``: 0 for II (full resolution by definition); for I, III and IV the given
    integer, or with ``"auto"`` the one that brings the smaller side nearest to 14 pixels for I and
    III, the paper's 28 -> 14 (1 for 28x28 and 32x32, 2 for 64x64, 4 for 224x224), and nearest to
    56 pixels for IV (2 for 224x224: a side of 28 left too little to reconstruct from, measured in
    bench/results/byo.magnet_cost.md): the receptive field and the cost per pixel scale with the
    image instead of staying those of a 28x28 picture."""
    if arch == "II":
        return 0
    if downsample != "auto":
        return int(downsample)
    side = min(int(s) for s in item_shape[-2:])
    return max(1, round(math.log2(max(side, 1) / (56 if arch == "IV" else 14))))


def autoencoder(arch: str, channels: int = 1, width: int = 3, activation: str = "sigmoid",
                downsample: int = 1) -> Autoencoder:
    """Autoencoder I (detector I and the reformer): conv-act, ``downsample`` times (avg-pool,
    conv-act), conv-act, ``downsample`` times (upsample, conv-act), conv-sigmoid to ``channels``.
    Autoencoder II (detector II): two conv-act layers and a conv-sigmoid, no pooling. All
    convolutions 3x3 with ``width`` filters; the paper uses ``width=3`` and sigmoid activations
    ("Conv.Sigmoid 3x3x3") and one pooling stage for 28x28. Autoencoder III (robustgate's, for a
    detector much cheaper than the classifier it guards): ``downsample`` strided conv-act layers,
    a conv-act, and 4x4 transposed convolutions back to full resolution (the last to ``channels``,
    sigmoid); with one stage ~1/6 of II's cost at width 16 (bench/results/detect.ae_cost.md).
    Autoencoder IV (robustgate's, for large images): pixel-unshuffle by ``r = 2**downsample``
    (``[N, C, H, W]`` -> ``[N, C*r*r, H/r, W/r]``: no pixel is dropped, the image is folded into
    channels), II's three convolutions at that resolution with ``max(width, C*r*r)`` filters (never
    fewer than the folded channels they read), pixel-shuffle back, sigmoid.
    With ``downsample=1`` I and III are exactly the layers (and state-dict keys) the 28x28 bundles
    were fitted with. The output is always a sigmoid, so reconstructions stay in [0, 1]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    act = nn.Sigmoid if activation == "sigmoid" else nn.ReLU
    conv = lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1)  # noqa: E731
    if arch == "I":
        layers: list[nn.Module] = [conv(channels, width), act()]
        for _ in range(downsample):
            layers += [nn.AvgPool2d(2), conv(width, width), act()]  # [N, w, H/2^i, W/2^i]
        layers += [conv(width, width), act()]
        for _ in range(downsample):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(width, width), act()]  # back up
        layers += [conv(width, channels), nn.Sigmoid()]  # [N, C, H, W]
        return Autoencoder(*layers, downsample=downsample)
    if arch == "II":
        return Autoencoder(conv(channels, width), act(), conv(width, width), act(), conv(width, channels), nn.Sigmoid())
    if arch == "III":  # robustgate's, not the paper's: autoencoder II's depth at reduced resolution
        layers = []
        for i in range(downsample):
            layers += [nn.Conv2d(channels if i == 0 else width, width, 3, stride=2, padding=1), act()]  # halves H, W
        layers += [conv(width, width), act()]
        for i in range(downsample):
            last = i == downsample - 1
            layers += [nn.ConvTranspose2d(width, channels if last else width, 4, stride=2, padding=1),
                       nn.Sigmoid() if last else act()]  # doubles H, W
        return Autoencoder(*layers, downsample=downsample)
    if arch == "IV":  # robustgate's, not the paper's: autoencoder II on the pixel-unshuffled image
        r = 2 ** downsample
        folded = channels * r * r
        w = max(width, folded)
        return Autoencoder(nn.PixelUnshuffle(r), conv(folded, w), act(), conv(w, w), act(), conv(w, folded),  # [N, C*r*r, H/r, W/r]
                           nn.PixelShuffle(r), nn.Sigmoid(), downsample=downsample)  # [N, C, H, W]
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def train_autoencoder(ae: nn.Module, x: torch.Tensor, *, noise: float, epochs: int, batch_size: int,
                      lr: float, weight_decay: float, seed: int, progress: bool = False, desc: str = "autoencoder",
                      device: str | torch.device = "cpu") -> list[float]:
    """Noise-regularized training on clean images ``x`` ``[N, C, H, W]`` in [0, 1]: minimize
    ``MSE(AE(clip(x + noise * eps)), x)``. Returns the mean loss per epoch. ``progress``: a tqdm
    bar over the epochs' batches (stderr) with the epoch and its running loss. ``device``: where
    ``ae`` trains (the batches and their noise are drawn on the host); ``ae`` ends on the CPU."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    ae.to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
    ae.train()
    history = []
    batches = -(-x.shape[0] // batch_size)
    bar = tqdm(total=epochs * batches, desc=desc, unit="batch", disable=not progress, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            xb = x[order[start:start + batch_size]]  # [B, C, H, W]
            noisy = (xb + noise * torch.randn(xb.shape, generator=g)).clamp(0.0, 1.0)
            loss = F.mse_loss(ae(noisy.to(device)), xb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total / min(start + batch_size, x.shape[0]):.5f}")
        history.append(total / x.shape[0])
    bar.close()
    ae.eval().to("cpu")
    return history


# ---- scores (pure tensor math) -------------------------------------------------------------------
def reconstruction_error(x: torch.Tensor, rec: torch.Tensor, p: int) -> torch.Tensor:
    """``||x - rec||_p`` per item over all pixels: ``[N, C, H, W]`` x2 -> ``[N]``."""
    return (x - rec).flatten(1).norm(p=p, dim=1)


def jensen_shannon(logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """JSD(P || Q) with ``P = softmax(logits_p / T)``, ``Q = softmax(logits_q / T)``:
    ``[N, K]`` x2 -> ``[N]`` (natural log; in [0, ln 2])."""
    log_p = F.log_softmax(logits_p / temperature, dim=1)
    log_q = F.log_softmax(logits_q / temperature, dim=1)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((p + q) / 2).clamp_min(-100.0)  # [N, K]
    kl_pm = (p * (log_p - log_m)).sum(1)
    kl_qm = (q * (log_q - log_m)).sum(1)
    return 0.5 * (kl_pm + kl_qm)


def reconstruction_error_graph(ae, p: int):
    """``ae`` (an autoencoder's ONNX model, one input ``[N, C, H, W]`` -> one output ``AE(x)``)
    extended to :func:`reconstruction_error`'s ``||x - AE(x)||_p`` per item: a new model whose one
    output, ``score`` ``[N]``, is the L1 (``p = 1``) or L2 (``p = 2``) error over all pixels."""
    import onnx
    from onnx import TensorProto, helper

    if p not in (1, 2):
        raise ValueError(f"reconstruction_error_graph: p must be 1 or 2, got {p!r}")
    model = onnx.ModelProto()
    model.CopyFrom(ae)
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ValueError("reconstruction_error_graph: the autoencoder graph must have one input and one output")
    x, rec = g.input[0].name, g.output[0].name
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    name = lambda base: next(f"{base}_{i}" for i in range(len(taken) + 1) if f"{base}_{i}" not in taken)  # noqa: E731
    diff, err, axes, score = name("score_diff"), name("score_err"), name("score_axes"), "score"
    if score in taken:
        raise ValueError("reconstruction_error_graph: the autoencoder graph already has a value named 'score'")
    g.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [3], [1, 2, 3]))
    g.node.append(helper.make_node("Sub", [x, rec], [diff]))
    if p == 1:
        g.node.extend([helper.make_node("Abs", [diff], [err]),
                       helper.make_node("ReduceSum", [err, axes], [score], keepdims=0)])
    else:
        total = name("score_sq_sum")
        g.node.extend([helper.make_node("Mul", [diff, diff], [err]),
                       helper.make_node("ReduceSum", [err, axes], [total], keepdims=0),
                       helper.make_node("Sqrt", [total], [score])])
    batch = g.input[0].type.tensor_type.shape.dim[0]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(score, TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "batch"]))
    return model


class AeSession:
    """The exported autoencoder in one ONNX Runtime CPU session: ``[N, C, H, W]`` torch tensor ->
    ``AE(x)`` (float32, no gradient). ``threads`` intra-op threads (idle workers do not spin, so
    that they leave shared cores to the backbone's session); ``optimization`` a key of
    ``ORT_OPTIMIZATION``."""

    def __init__(self, path: Path, threads: int = 1, optimization: str = "all"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ORT_OPTIMIZATION[optimization]
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.item_shape = tuple(int(d) for d in self.session.get_inputs()[0].shape[1:])  # (C, H, W)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (rec,) = self.session.run(None, {self.input_name: arr})
        return torch.from_numpy(np.asarray(rec, dtype=np.float32)).to(x.device)


class _AutoencoderDefense:
    """What the detector and the reformer share: config validation, the autoencoder in two
    runtimes, fit, save and load."""

    kind: ClassVar[str]
    needs_artifacts: ClassVar[bool] = True

    def _init_ae(self, arch, width, activation, noise, epochs, batch_size, lr, weight_decay, seed, runtime,
                 onnx_threads=1, onnx_optimization="all", downsample="auto") -> None:
        if arch not in (*ARCHS, "auto"):
            raise ValueError(f"{self.kind}: arch must be one of {', '.join(ARCHS)} or auto, got {arch!r}")
        if downsample != "auto" and (isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1):
            raise ValueError(f"{self.kind}: downsample must be 'auto' or an integer >= 1, got {downsample!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{self.kind}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        check_runtime(runtime)
        if onnx_optimization not in ORT_OPTIMIZATION:
            raise ValueError(f"{self.kind}: onnx_optimization must be one of {', '.join(ORT_OPTIMIZATION)}, "
                             f"got {onnx_optimization!r}")
        for name, v in (("width", width), ("epochs", epochs), ("batch_size", batch_size), ("onnx_threads", onnx_threads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.kind}: {name} must be a positive integer, got {v!r}")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"{self.kind}: noise must lie in [0, 1), got {noise}")
        if not lr > 0:
            raise ValueError(f"{self.kind}: lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"{self.kind}: weight_decay must be >= 0, got {weight_decay}")
        self.arch, self.width, self.activation = arch, width, activation
        self.noise, self.epochs = float(noise), epochs
        self.batch_size, self.lr, self.weight_decay = batch_size, float(lr), float(weight_decay)
        self.seed, self.runtime, self.downsample = int(seed), runtime, downsample
        self.onnx_threads, self.onnx_optimization = onnx_threads, onnx_optimization
        self.ae: nn.Module | None = None  # torch twin
        self._onnx: AeSession | None = None
        self._onnx_path: Path | None = None  # ae.onnx, once loaded (onnx_score_model)
        self._channels: int | None = None
        self._item_shape: tuple[int, ...] | None = None
        self.history: list[float] = []

    def _fit_ae(self, data: FitData) -> None:
        self._channels = data.train_x.shape[1]
        self._item_shape = tuple(data.train_x.shape[1:])  # (C, H, W) of the ONNX export
        with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
            torch.manual_seed(self.seed)
            ae = self._build_ae(self._item_shape)
        self.history = train_autoencoder(
            ae, data.train_x.float(), noise=self.noise, epochs=self.epochs, batch_size=self.batch_size,
            lr=self.lr, weight_decay=self.weight_decay, seed=self.seed, progress=data.progress,
            desc=f"{self.kind} autoencoder {resolve_arch(self.arch, self._item_shape)}", device=data.device,
        )
        self.ae = ae.requires_grad_(False)
        self._onnx = None

    def _build_ae(self, item_shape: tuple[int, ...]) -> Autoencoder:
        """The configured autoencoder sized to items ``(C, H, W)`` (arch, channels, down-sampling stages)."""
        arch = resolve_arch(self.arch, item_shape)
        stages = resolve_downsample(arch, self.downsample, item_shape)
        return autoencoder(arch, int(item_shape[0]), self.width, self.activation, stages)

    def save(self, directory: Path) -> dict[str, str]:
        """Writes ``ae.safetensors`` (torch twin) and ``ae.onnx`` (proxy) into ``directory``."""
        if self.ae is None or self._item_shape is None:
            raise ValueError(f"{self.kind}: nothing to save; call fit first")
        example = torch.zeros(2, *self._item_shape)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self.ae, directory / "ae.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the padding is fixed at the item shape
            export_onnx(self.ae, example, directory / "ae.onnx")
        return {"ae_weights": "ae.safetensors", "ae_onnx": "ae.onnx"}

    def load_artifacts(self, files: dict[str, Path]) -> None:
        missing = {"ae_weights", "ae_onnx"} - set(files)
        if missing:
            raise ValueError(f"{self.kind}: artifacts {sorted(missing)} missing (got {sorted(files)})")
        session = AeSession(files["ae_onnx"], self.onnx_threads, self.onnx_optimization)
        self._item_shape = session.item_shape  # (C, H, W) the autoencoder was fitted and exported at
        self._channels = int(self._item_shape[0])
        try:
            self.ae = load_weights(self._build_ae(self._item_shape), files["ae_weights"]).requires_grad_(False)
        except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or wrong shapes
            arch = resolve_arch(self.arch, self._item_shape)
            raise ValueError(f"{self.kind}: the autoencoder weights do not fit arch {arch} width {self.width} "
                             f"downsample {self.downsample} at {self._item_shape}: {exc}") from exc
        self._onnx = session if self.runtime == "onnx" else None
        self._onnx_path = Path(files["ae_onnx"])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``AE(x)``: ``[N, C, H, W]`` -> ``[N, C, H, W]`` in [0, 1] (sigmoid output)."""
        if self.ae is None:
            raise ValueError(f"{self.kind}: not fitted (no autoencoder); run `robustgate fit` or load_artifacts")
        if self._item_shape is not None and tuple(x.shape[1:]) != tuple(self._item_shape):
            raise ValueError(f"{self.kind}: the autoencoder was fitted on items {tuple(self._item_shape)}, "
                             f"got shape {tuple(x.shape)}")
        if self.runtime == "onnx":
            if self._onnx is None:
                raise ValueError(f"{self.kind}: runtime 'onnx' needs the ae_onnx artifact (load_artifacts)")
            return self._onnx(x)
        return self.ae(x)

    def to(self, device):
        if self.ae is not None:
            self.ae.to(device)
        return self


@register
class MagNet(_AutoencoderDefense, Detector):
    """One MagNet detector (see module docstring). Score: reconstruction error (``l1``/``l2``)
    or JSD at ``temperature`` (``jsd``); higher = farther from the clean manifold. Flags
    ``score > threshold`` (threshold set by ``robustgate fit`` at the target clean FPR).

    Args:
        criterion: ``"l1"``, ``"l2"`` or ``"jsd"``.
        temperature: ``T`` of the JSD criterion (ignored otherwise), > 0.
        arch: autoencoder ``"I"`` (pooling), ``"II"`` (no pooling), ``"III"`` (strided, II at reduced
            resolution), ``"IV"`` (II on the pixel-unshuffled image) or ``"auto"`` (default: II below
            ``AUTO_ARCH_SIDE`` pixels a side, IV from there; :func:`resolve_arch`).
        width: filters per conv layer (the paper: 3).
        activation: hidden activation, ``"sigmoid"`` (the paper) or ``"relu"``.

    Defaults (l1, autoencoder II -- IV for large images --, width 32, ReLU, 5 epochs) differ from the paper's MNIST
    autoencoders (width 3, sigmoid, 100 epochs): measured on Fashion-MNIST with the CPU budget of
    this project (20,000 training images, 5 epochs, PGD eps 0.1 on a small CNN), the paper's
    autoencoder I with L2 reached ROC AUC 0.55, width 32 + ReLU autoencoder I 0.92 (L2) / 0.98 (L1),
    and autoencoder II width 32 + ReLU 0.987 (L2) / 0.9975 (L1) -- see bench/results/detect.md.
        noise: std of the Gaussian noise added to training inputs (the paper: 0.1).
        epochs, batch_size, lr, weight_decay, seed: autoencoder training (Adam; the paper
            trains 100 epochs with L2 regularization 1e-9).
        runtime: ``"torch"`` (differentiable twin, default) or ``"onnx"`` (ONNX Runtime, proxy).
        onnx_threads: intra-op threads of the ONNX Runtime session (``runtime="onnx"``).
        onnx_optimization: its graph optimization level, ``"all"`` (default), ``"extended"`` (faster
            for narrow autoencoders, see ``ORT_OPTIMIZATION``) or ``"basic"``. Same scores.
        downsample: 2x down-sampling stages of autoencoders I, III and IV (II has none): ``"auto"``
            (default; from the fitted image size, :func:`resolve_downsample`: I and III 1 at 28x28 and
            32x32, 4 at 224x224; IV 2 at 224x224) or an integer >= 1. Any height and width works
            (padded, then cropped).
        threshold: calibrated threshold (set by fit/calibration).
    """

    kind = "magnet"

    def __init__(self, criterion: str = "l1", temperature: float = 10.0, arch: str = "auto", width: int = 32,
                 activation: str = "relu", noise: float = 0.1, epochs: int = 5, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 1e-9, seed: int = 0, runtime: str = "torch", onnx_threads: int = 1,
                 onnx_optimization: str = "all", downsample: int | str = "auto", threshold: float | None = None):
        Detector.__init__(self, threshold)
        if criterion not in CRITERIA:
            raise ValueError(f"magnet: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if not temperature > 0:
            raise ValueError(f"magnet: temperature must be positive, got {temperature}")
        self.criterion, self.temperature = criterion, float(temperature)
        self._init_ae(arch, width, activation, noise, epochs, batch_size, lr, weight_decay, seed, runtime,
                      onnx_threads, onnx_optimization, downsample)

    @classmethod
    def served_runtime(cls, params: dict) -> str | None:
        """ONNX Runtime for l1 / l2 (the proxy fuses ``ae.onnx`` and the error into the backbone's
        session: one session call per batch; at 224x224 in front of a ResNet-50 it cost 2.6% of the
        throughput against 11.1% in torch, bench/results/byo.resnet50.md); jsd keeps the recorded
        runtime (it needs the backbone on ``AE(x)``, not fused)."""
        return "onnx" if params.get("criterion", "l1") in ("l1", "l2") else None

    def fit(self, data: FitData, classifier: Classifier | None = None) -> None:
        """Trains the autoencoder on ``data.train_x`` (clean); calibration is done by the caller."""
        check_images(data.train_x, data.value_range, who="magnet.fit train_x")
        self._fit_ae(data)

    def score(self, x: torch.Tensor, classifier: Classifier | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N]``; differentiable in ``x`` with ``runtime="torch"``."""
        check_images(x, who="magnet.score input")
        if self.criterion == "jsd" and classifier is None:
            raise ValueError("magnet: criterion 'jsd' needs the classifier (score(x, classifier))")
        rec = self.reconstruct(x)  # [N, C, H, W]
        if self.criterion == "l1":
            return reconstruction_error(x, rec, 1)
        if self.criterion == "l2":
            return reconstruction_error(x, rec, 2)
        return jensen_shannon(classifier.logits(x), classifier.logits(rec), self.temperature)

    def onnx_score_model(self):
        """With ``runtime="onnx"`` and a reconstruction-error criterion (l1, l2): ``ae.onnx`` plus the
        error, for the proxy to fuse into the backbone's graph (Detector.onnx_score_model). None for
        the torch runtime and for ``jsd`` (it needs the backbone on ``AE(x)``)."""
        if self.runtime != "onnx" or self.criterion == "jsd" or self._onnx is None:
            return None
        import onnx

        return reconstruction_error_graph(onnx.load(str(self._onnx_path)), 1 if self.criterion == "l1" else 2)


@register
class MagNetReformer(_AutoencoderDefense, Purifier):
    """MagNet's reformer: ``purify(x) = AE(x)``, an autoencoder trained as the detectors' are
    (default autoencoder I). Deterministic and differentiable (``bpda`` is ``AE`` itself in
    torch), so the red team attacks straight through it."""

    kind = "reformer"

    def __init__(self, arch: str = "I", width: int = 32, activation: str = "relu", noise: float = 0.1, epochs: int = 5,
                 batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-9, seed: int = 0,
                 runtime: str = "torch", onnx_threads: int = 1, onnx_optimization: str = "all",
                 downsample: int | str = "auto"):
        self._init_ae(arch, width, activation, noise, epochs, batch_size, lr, weight_decay, seed, runtime,
                      onnx_threads, onnx_optimization, downsample)

    def fit(self, data: FitData, classifier: Classifier | None = None) -> None:
        check_images(data.train_x, data.value_range, who="reformer.fit train_x")
        self._fit_ae(data)

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="reformer.purify input")
        return self.reconstruct(x).to(x.dtype)

    def bpda(self, x: torch.Tensor) -> torch.Tensor:
        if self.ae is None:
            raise ValueError("reformer: not fitted (no autoencoder)")
        return self.ae(x)
