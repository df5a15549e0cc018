"""Diffusion purification (DiffPure; Nie et al., ICML 2022, "Diffusion Models for Adversarial
Purification"), with a small DDPM (Ho et al., NeurIPS 2020) trained on the dataset and a DDIM
reverse process (Song et al., ICLR 2021).

Purification of ``x`` (pixels in ``[0, 1]``, mapped to ``z_0 = 2x - 1``):

1. diffuse to ``t*``:  ``z_t* = sqrt(abar_t*) z_0 + sqrt(1 - abar_t*) eps``, ``eps ~ N(0, I)``;
2. run the deterministic DDIM reverse process (eta = 0) from ``t*`` to 0 in ``k`` steps on the
   timesteps ``tau_k = t* > ... > tau_1 > 0``:
       ``x0_hat = clip((z_tau - sqrt(1 - abar_tau) eps_theta(z_tau, tau)) / sqrt(abar_tau), -1, 1)``
       ``z_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_theta(z_tau, tau)``
   with ``abar_prev = 1`` after the last step (DDIMScheduler's ``set_alpha_to_one``);
3. map back: ``x_pur = clamp((z_0 + 1) / 2, 0, 1)``.

Symbols: ``t*`` = ``t_star`` (an integer timestep of the ``num_train_timesteps`` schedule; 0 returns
the input exactly), ``k`` = ``steps``, ``abar_t`` = DDIMScheduler's ``alphas_cumprod[t]`` (linear
betas 1e-4..0.02, Ho et al.), ``eps_theta`` = the UNet.

Why the DDIM update is written here: ``DDIMScheduler.step`` derives the previous timestep from a
fixed stride ``num_train_timesteps // num_inference_steps`` over the whole schedule, while
DiffPure's reverse process starts at an arbitrary ``t*``; the update (Song et al., eq. 12 with
sigma = 0) is three lines over the scheduler's own ``alphas_cumprod``. The forward diffusion and
training use ``DDPMScheduler.add_noise``.

The model: a diffusers ``UNet2DModel`` without attention (3 resolution levels, ~1.06M parameters
at the default widths 32/64/64 for one channel), sized to the data it is fitted on: its channels
(1 for Fashion-MNIST, 3 for RGB; ``channels=None`` takes them from the data) and its sample size
(recorded in the UNet's config). Any height and width works: the input is padded (replicate) to
the multiple of ``2**(levels - 1)`` its down-sampling needs and cropped back (28x28 needs none
with 3 levels: 28 -> 14 -> 7; 32x32 and 224x224 none either). The widths
(``block_out_channels``) and depth are parameters; larger images cost more per image (the
convolutions scale with H x W), so narrower widths or fewer ``train_steps`` suit them on a CPU.

Training budget (``fit`` -> :func:`train_ddpm`): ``train_steps`` Adam steps of batch
``batch_size`` of the epsilon-prediction loss, timesteps drawn uniformly from
``[0, train_t_max]`` only (purification never uses larger ``t``, so the CPU budget goes where it
is used), EMA of the weights (decay ``ema_decay``). The defaults (1,000 steps x 32 images, about
0.6 epoch of Fashion-MNIST) were sized at ~1.2 s per step on one torch thread of the shared
2-core machine (~20 minutes); the first recorded run took 2,330 s (39 min) because the machine's
load average stayed at 9-15 from other jobs, and ``robustgate fit --bundle bundles/default --defense
diffusion --name diffusion`` re-ran it in 540 s (one torch thread, load ~4) with bit-identical
weights (``bench/defenses/train_diffusion.py``; its loss curve and
time are kept in the artifact's JSON; clean accuracy vs t* in bench/results/defenses.diffusion_accuracy.md).
Under CPU contention one torch thread trains several times faster than two.

Known limits: the purified image is random (``randomized = True``): evaluate with EOT over the
diffusion noise. The whole sampler is differentiable, so the red team attacks through the DDIM
steps (``differentiable = True``); DiffPure's reported robustness came from the adjoint method
over an SDE, and later work showed that exact full gradients through the sampler lower it
substantially (Lee & Kim, ICCV 2023, "Robust Evaluation of Diffusion-Based Adversarial
Purification"). A CPU-sized DDPM trained for minutes denoises but blurs: larger ``t*`` removes
more of the perturbation and more of the image (clean accuracy falls).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from robustgate.defenses.base import Classifier, FitData, Purifier, check_images, register
from robustgate.defenses.runtime import OnnxModel, check_runtime, export_onnx

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

# diffusers is imported where a UNet or a scheduler is built, not with this module: importing it
# costs ~2.4 s (torch._dynamo, scipy.stats), which every serving process, worker and CLI call paid
# at start-up whether or not its pipeline has a diffusion stage (importing defenses.purify
# registers every kind)

WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE = "diffusion_unet.safetensors", "diffusion_unet.json", "diffusion_unet.onnx"
ONNX_PARITY_ATOL = 1e-4  # max |eps_onnx - eps_torch| accepted when the ONNX graph is written


# ---- pure functions ------------------------------------------------------------------------------

def make_unet(channels: int, block_out_channels: list[int], layers_per_block: int, seed: int,
              sample_size: int = 28) -> UNet2DModel:
    """A small attention-free ``UNet2DModel`` (deterministic initialization from ``seed``) for
    ``channels``-channel images; ``sample_size`` (the image side) is recorded in its config only:
    the weights do not depend on it and any size runs (padded by :func:`ddim_purify`)."""
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            norm_num_groups=8,
        )


def make_schedulers(num_train_timesteps: int) -> tuple[DDPMScheduler, DDIMScheduler]:
    """Forward-process (training, add_noise) and DDIM schedulers sharing the linear beta schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=False)
    ddim = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=True, set_alpha_to_one=True)
    return ddpm, ddim


def reverse_timesteps(t_star: int, steps: int) -> list[int]:
    """``k`` = ``steps`` DDIM timesteps from ``t*`` down (evenly spaced, distinct, > 0)."""
    taus = torch.linspace(t_star, 0, steps + 1).round().long().tolist()[:-1]
    return sorted({t for t in taus if t > 0}, reverse=True)


def _pad_multiple(z: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = z.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return z, (h, w)
    return F.pad(z, (0, pw, 0, ph), mode="replicate"), (h, w)  # [N, C, H+ph, W+pw]


EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z [N, C, H, W], t [N] int64) -> eps [N, C, H, W]


def torch_eps(unet: UNet2DModel) -> EpsModel:
    """``eps_theta`` as the torch UNet (differentiable)."""
    return lambda z, t: unet(z, t).sample


def onnx_eps(model: OnnxModel) -> EpsModel:
    """``eps_theta`` as the exported UNet in ONNX Runtime (no gradient)."""
    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model.run_feeds({"sample": np.ascontiguousarray(z.detach().cpu().numpy(), dtype=np.float32),
                               "timestep": t.detach().cpu().numpy().astype(np.int64)})
        return torch.from_numpy(out).to(z.device)
    return eps


def ddim_purify(eps_model: EpsModel, alphas_cumprod: torch.Tensor, x: torch.Tensor, t_star: int, steps: int,
                generator: torch.Generator | None = None, multiple: int = 4) -> torch.Tensor:
    """DiffPure with a DDIM reverse process (module docstring, steps 1-3); ``eps_model`` is
    ``eps_theta`` (:func:`torch_eps` or :func:`onnx_eps`).

    ``x`` ``[N, C, H, W]`` in ``[0, 1]`` -> ``[N, C, H, W]`` in ``[0, 1]``; differentiable in ``x``
    when gradients are enabled and ``eps_model`` is. ``t_star = 0`` returns ``x`` itself."""
    if t_star == 0:
        return x
    abar = alphas_cumprod.to(device=x.device, dtype=x.dtype)  # [T]
    z0, (h, w) = _pad_multiple(2.0 * x - 1.0, multiple)  # [N, C, H', W'] in [-1, 1]
    # 1. forward diffusion to t*
    eps = torch.randn(z0.shape, generator=generator, device=x.device, dtype=x.dtype)
    z = abar[t_star].sqrt() * z0 + (1.0 - abar[t_star]).sqrt() * eps  # z_t*
    # 2. DDIM (eta = 0) from t* to 0 in k steps
    taus = reverse_timesteps(t_star, steps)
    for i, tau in enumerate(taus):
        a_t = abar[tau]
        a_prev = abar[taus[i + 1]] if i + 1 < len(taus) else torch.ones_like(a_t)
        t_batch = torch.full((z.shape[0],), tau, device=x.device, dtype=torch.long)
        eps_hat = eps_model(z, t_batch)  # eps_theta(z_tau, tau)
        x0_hat = ((z - (1.0 - a_t).sqrt() * eps_hat) / a_t.sqrt()).clamp(-1.0, 1.0)
        z = a_prev.sqrt() * x0_hat + (1.0 - a_prev).sqrt() * eps_hat  # z_prev
    # 3. back to pixels
    return ((z[..., :h, :w] + 1.0) / 2.0).clamp(0.0, 1.0)


def train_ddpm(unet: UNet2DModel, ddpm: DDPMScheduler, images: torch.Tensor, steps: int, batch_size: int,
               lr: float, t_max: int, seed: int, ema_decay: float = 0.995, multiple: int = 4,
               log: Callable[[dict[str, Any]], None] | None = None, log_every: int = 50,
               progress: bool = False, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Trains ``unet`` in place with the DDPM epsilon-prediction loss (Ho et al., Algorithm 1) on
    ``images`` ``[N, C, H, W]`` in ``[0, 1]``, timesteps uniform in ``[0, t_max]``; Adam with a
    50-step linear warmup; at the end the weights are replaced by their EMA. Returns a training
    record (steps, seconds, loss curve). ``progress``: a tqdm bar (stderr) over the steps with the
    epoch (images seen / N) and the mean loss of the last ``log_every`` steps. ``device``: where the
    UNet trains (each batch, its noise and timesteps are drawn on the host); it ends on the CPU."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    unet.to(device)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    losses: list[float] = []
    was_training = unet.training
    unet.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="diffusion UNet", unit="step", disable=not progress, leave=False)
    try:
        for step in bar:
            idx = torch.randint(0, len(images), (batch_size,), generator=g)
            z0, _ = _pad_multiple(2.0 * images[idx] - 1.0, multiple)  # [B, C, H', W']
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, t_max + 1, (batch_size,), generator=g)  # [B]
            z0, noise, t = z0.to(device), noise.to(device), t.to(device)
            loss = F.mse_loss(unet(ddpm.add_noise(z0, noise, t), t).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].lerp_(v, 1.0 - ema_decay)
                    else:
                        ema[k].copy_(v)
            losses.append(loss.item())
            if progress and (step % 10 == 9 or step + 1 == steps):
                recent = losses[-log_every:]
                bar.set_postfix(epoch=f"{(step + 1) * batch_size / len(images):.2f}", loss=f"{sum(recent) / len(recent):.4f}")
            if log is not None and (step + 1) % log_every == 0:
                log({"step": step + 1, "loss": sum(losses[-log_every:]) / log_every,
                     "seconds": round(time.perf_counter() - t0, 1)})
    finally:
        bar.close()
        unet.train(was_training)
    unet.load_state_dict(ema)
    unet.to("cpu")
    curve = [round(sum(losses[i:i + log_every]) / len(losses[i:i + log_every]), 5)
             for i in range(0, len(losses), log_every)]
    return {"steps": steps, "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 1),
            "loss_curve_every": log_every, "loss_curve": curve}


class _EpsNet(torch.nn.Module):
    """``(sample, timestep) -> eps``: the UNet with a plain tensor output, for ONNX export."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


def export_unet(unet: UNet2DModel, path: Path, channels: int, multiple: int) -> float:
    """Writes ``unet`` as ONNX (inputs ``sample`` [N, C, H, W] with N, H, W dynamic and
    ``timestep`` [N] int64; output ``eps``), then checks ONNX Runtime against torch on two probe
    shapes; returns the max abs difference, raising ValueError above ``ONNX_PARITY_ATOL``."""
    net = _EpsNet(unet).eval()
    g = torch.Generator().manual_seed(0)
    side = 7 * multiple  # 28 for the default 3-level UNet
    example = (torch.randn(2, channels, side, side, generator=g), torch.tensor([10, 200]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from diffusers' shape asserts
        export_onnx(net, example, path, input_name=("sample", "timestep"), output_name="eps",
                    dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"},
                                  "eps": {0: "batch", 2: "height", 3: "width"}})
    session, worst = OnnxModel(path, output="eps"), 0.0
    for n, h in ((3, side), (1, 2 * multiple)):
        z, t = torch.randn(n, channels, h, h, generator=g), torch.randint(0, 300, (n,), generator=g)
        with torch.no_grad():
            want = net(z, t)
        worst = max(worst, float((onnx_eps(session)(z, t) - want).abs().max()))
    if worst > ONNX_PARITY_ATOL:
        raise ValueError(f"diffusion: ONNX UNet differs from torch by {worst:.3g} > {ONNX_PARITY_ATOL}")
    return worst


# ---- the purifier --------------------------------------------------------------------------------

def _int_in(name: str, v: object, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"diffusion: {name} must be an integer {rng}, got {v!r}")
    return v


@register
class DiffusionPurifier(Purifier):
    """DiffPure with a small DDPM and a ``steps``-step DDIM reverse process from ``t_star``.

    Args:
        t_star: diffusion timestep to purify from (0 = identity; <= ``train_t_max``).
        steps: DDIM reverse steps ``k`` (>= 1; at most ``t_star`` distinct steps are used).
        channels: image channels (1 for Fashion-MNIST, 3 for RGB); None (default): those of the
            images ``fit`` gets (or of the loaded artifacts; an unfitted purifier takes the first
            input's). The bundle records the number.
        sample_size: the image side recorded in the UNet's config; None (default): the fitted
            images' larger side (28 until fitted). Any size runs (padding, module docstring).
        block_out_channels, layers_per_block: UNet widths and depth (3 levels = 2 downsamplings).
        num_train_timesteps: length of the DDPM schedule.
        train_t_max, train_steps, batch_size, lr, ema_decay, seed: the ``fit`` recipe (seed also
            fixes the untrained initialization).
        runtime: ``"torch"`` (differentiable twin, the red team's; default) or ``"onnx"`` (the
            exported UNet in ONNX Runtime, what the proxy runs; needs the ``onnx`` artifact).
        onnx_threads: ONNX Runtime intra-op threads (0 = its default, one per core).
    """

    kind: ClassVar[str] = "diffusion"
    needs_artifacts: ClassVar[bool] = True
    randomized: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True

    def __init__(self, t_star: int = 100, steps: int = 2, channels: int | None = None,
                 block_out_channels: list[int] | None = None, layers_per_block: int = 1,
                 num_train_timesteps: int = 1000, train_t_max: int = 300, train_steps: int = 1000,
                 batch_size: int = 32, lr: float = 2e-3, ema_decay: float = 0.995, seed: int = 0,
                 runtime: str = "torch", onnx_threads: int = 0, sample_size: int | None = None):
        self.num_train_timesteps = _int_in("num_train_timesteps", num_train_timesteps, 2)
        self.train_t_max = _int_in("train_t_max", train_t_max, 1, num_train_timesteps - 1)
        self.t_star = _int_in("t_star", t_star, 0, self.train_t_max)
        self.steps = _int_in("steps", steps, 1)
        self.channels = None if channels is None else _int_in("channels", channels, 1)
        self.sample_size = None if sample_size is None else _int_in("sample_size", sample_size, 1)
        boc = [32, 64, 64] if block_out_channels is None else block_out_channels
        if (isinstance(boc, str) or not isinstance(boc, (list, tuple)) or len(boc) < 1
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 8 or c % 8 for c in boc)):
            raise ValueError(f"diffusion: block_out_channels must be a non-empty list of multiples of 8, got {boc!r}")
        self.block_out_channels = list(boc)
        self.layers_per_block = _int_in("layers_per_block", layers_per_block, 1)
        self.train_steps = _int_in("train_steps", train_steps, 1)
        self.batch_size = _int_in("batch_size", batch_size, 1)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"diffusion: lr must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"diffusion: ema_decay must lie in [0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.seed = _int_in("seed", seed, 0)
        try:
            check_runtime(runtime)
        except ValueError as exc:
            raise ValueError(f"diffusion: {exc}") from None
        self.runtime = runtime
        self.onnx_threads = _int_in("onnx_threads", onnx_threads, 0)
        self._onnx: OnnxModel | None = None
        self.unet: UNet2DModel | None = None  # built for the channels once known (_build_unet)
        if self.channels is not None:
            self._build_unet(self.channels, self.sample_size)
        self.ddpm, self.ddim = make_schedulers(self.num_train_timesteps)
        self.fitted = False
        self.training_record: dict[str, Any] | None = None
        self._warned_unfitted = False

    def _build_unet(self, channels: int, sample_size: int | None) -> UNet2DModel:
        """(Re)creates the untrained UNet for ``channels`` (initialization fixed by ``seed``)."""
        self.channels, self.sample_size = channels, sample_size
        self.unet = make_unet(channels, self.block_out_channels, self.layers_per_block, self.seed,
                              sample_size or 28).eval()
        return self.unet

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(x, who="diffusion")
        if self.unet is None:  # unfitted, channels from the data: the first input's
            self._build_unet(int(x.shape[1]), self.sample_size)
        if x.shape[1] != self.channels:
            raise ValueError(f"diffusion: model has {self.channels} channel(s), input has {x.shape[1]}")
        if not self.fitted and self.t_star > 0 and not self._warned_unfitted:
            warnings.warn("diffusion: purifying with an untrained UNet (fit it or load its artifacts)", stacklevel=2)
            self._warned_unfitted = True
        if self.runtime == "onnx":
            if self._onnx is None:
                raise ValueError("diffusion: runtime 'onnx' needs the 'onnx' artifact (load_artifacts)")
            if torch.is_grad_enabled() and x.requires_grad:
                raise ValueError("diffusion: runtime 'onnx' has no gradient; attack the runtime 'torch' twin")
            return ddim_purify(onnx_eps(self._onnx), self.ddim.alphas_cumprod, x, self.t_star, self.steps,
                               generator, self.multiple)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return ddim_purify(torch_eps(self.unet), self.ddim.alphas_cumprod, x, self.t_star, self.steps, generator,
                               self.multiple)

    def fit(self, data: FitData, classifier: Classifier | None = None,
            log: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Trains the DDPM on ``data.train_x`` with the constructor's recipe (see module docstring)."""
        check_images(data.train_x, data.value_range, who="diffusion fit")
        c, side = int(data.train_x.shape[1]), int(max(data.train_x.shape[-2:]))
        if self.channels is not None and c != self.channels:
            raise ValueError(f"diffusion: model has {self.channels} channel(s), data has {c}")
        if not self.fitted:  # sized to the data (the same seeded initialization as at construction)
            self._build_unet(c, self.sample_size or side)
        self.training_record = train_ddpm(
            self.unet, self.ddpm, data.train_x, self.train_steps, self.batch_size, self.lr, self.train_t_max,
            self.seed, self.ema_decay, self.multiple, log=log, progress=data.progress, device=data.device,
        )
        self.unet.eval()
        self.fitted = True

    def save(self, directory: Path) -> dict[str, str]:
        if self.unet is None:
            raise ValueError("diffusion: nothing to save; fit it first (the UNet's channels come from the data)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        parity = export_unet(self.unet, directory / ONNX_FILE, self.channels, self.multiple)
        meta = {"unet": dict(self.unet.config), "num_train_timesteps": self.num_train_timesteps,
                "training": self.training_record, "onnx_max_abs_diff": parity}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=list) + "\n")
        return {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "onnx": ONNX_FILE}

    def load_artifacts(self, files: dict[str, Path]) -> None:
        if not {"weights", "config"} <= set(files) <= {"weights", "config", "onnx"}:
            raise ValueError(f"diffusion: expected artifacts 'weights', 'config' (and 'onnx'), got {sorted(files)}")
        meta = json.loads(Path(files["config"]).read_text())
        saved = meta["unet"]
        for key, mine in (("block_out_channels", self.block_out_channels), ("layers_per_block", self.layers_per_block),
                          ("in_channels", self.channels), ("sample_size", self.sample_size)):
            if mine is None:  # unset: the artifact's
                continue
            if (list(saved[key]) if isinstance(mine, list) else saved[key]) != mine:
                raise ValueError(f"diffusion: artifact UNet has {key}={saved[key]!r}, config says {mine!r}")
        if meta["num_train_timesteps"] != self.num_train_timesteps:
            raise ValueError(f"diffusion: artifact schedule has {meta['num_train_timesteps']} timesteps, "
                             f"config says {self.num_train_timesteps}")
        if self.unet is None or (self.channels, self.sample_size) != (saved["in_channels"], saved["sample_size"]):
            self._build_unet(int(saved["in_channels"]), int(saved["sample_size"]))
        self.unet.load_state_dict(load_file(str(files["weights"])))
        self.unet.eval()
        self._onnx = None
        if self.runtime == "onnx":
            if "onnx" not in files:
                raise ValueError("diffusion: runtime 'onnx' needs the 'onnx' artifact; re-save the model to write it")
            self._onnx = OnnxModel(files["onnx"], output="eps", threads=self.onnx_threads)
        self.training_record = meta.get("training")
        self.fitted = True

    def to(self, device: torch.device | str) -> "DiffusionPurifier":
        if self.unet is not None:
            self.unet.to(device)
        return self
