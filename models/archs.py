"""Backbone architectures, found by name: ``build_arch("cnn", **kwargs)``.

Every architecture is an ``nn.Module`` that takes raw pixels ``x`` ``[N, C, H, W]`` in ``[0, 1]``
(normalization is a buffer *inside* the model, so attacks work in pixel space) and offers

- ``forward(x) -> logits [N, K]``
- ``features(x) -> [N, D]`` -- the late-stage ReLU activations that feed the final linear layer
  (``logits = head(features(x))``), what SafetyNet (Lu et al. 2017) quantizes into binary codes.

Registered architectures:

- ``cnn`` (default): a small VGG-style CNN sized for the CPU (two conv blocks, one ReLU hidden
  layer); ``width`` and ``hidden`` scale it. At the default ``width=32, hidden=128`` it has
  ~0.47M parameters on 28x28 inputs.
- ``preact_resnet18``: PreAct ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual
  Networks"), the usual CIFAR-10 adversarial-training backbone (Rice et al. 2020). Too slow for
  this CPU beyond a smoke test.
- ``vit_tiny``: a ViT-Tiny-style encoder (Dosovitskiy et al. 2021; DeiT-Ti widths, Touvron et al.
  2021) with a ReLU pre-logit layer, so it too has ReLU features. Shared with MIMIR (Xu et al.
  2023), which pre-trains it as a masked autoencoder.

The constructor's keyword arguments are the configuration (stored as ``arch_kwargs`` in the
bundle); ``build_arch(name, **arch_kwargs)`` rebuilds the same module.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ARCHS: dict[str, type[nn.Module]] = {}

# Per-dataset pixel statistics (train split), used as the in-model normalization defaults.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def register_arch(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: makes an architecture buildable by ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ARCHS:
            raise TypeError(f"architecture {name!r} is registered twice")
        _ARCHS[name] = cls
        return cls

    return deco


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def arch_class(name: str) -> type[nn.Module]:
    if name not in _ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(arch_names())}")
    return _ARCHS[name]


def build_arch(name: str, **kwargs) -> nn.Module:
    """Builds the registered architecture ``name`` with its keyword arguments."""
    return arch_class(name)(**kwargs)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as buffers, so it is saved and exported with the model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _check_common(in_channels: int, num_classes: int, mean: tuple, std: tuple) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per channel), got {len(mean)}/{len(std)}")


# ---------------------------------------------------------------------------------------------
# cnn
# ---------------------------------------------------------------------------------------------
@register_arch("cnn")
class SmallCNN(nn.Module):
    """conv-conv-pool, conv-conv-pool, linear-ReLU (features), linear (logits).

    Widths ``width, width, 2*width, 2*width``, 3x3 convolutions with padding 1, 2x2 max-pooling.
    ``image_size`` must be divisible by 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        width: int = 32,
        hidden: int = 128,
        mean: tuple[float, ...] = FASHION_MNIST_MEAN,
        std: tuple[float, ...] = FASHION_MNIST_STD,
    ):
        super().__init__()
        _check_common(in_channels, num_classes, tuple(mean), tuple(std))
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
        if width < 1 or hidden < 1:
            raise ValueError(f"width and hidden must be >= 1, got {width}, {hidden}")
        self.normalize = Normalize(tuple(mean), tuple(std))
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # [N, w, H/2, W/2]
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 2w, H/4, W/4]
            nn.Flatten(),
            nn.Linear(2 * w * (image_size // 4) ** 2, hidden), nn.ReLU(),  # [N, hidden]
        )
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, hidden]
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, K]
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# preact_resnet18
# ---------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


@register_arch("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreAct ResNet-18; ``features`` = ReLU(BN(last block)) average-pooled, ``[N, 8*width]``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ):
        super().__init__()
        _check_common(in_channels, num_classes, tuple(mean), tuple(std))
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # -> [N, 8*width]
        out = self.layers(self.stem(self.normalize(x)))
        out = F.relu(self.bn(out))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# vit_tiny
# ---------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE's ``get_2d_sincos_pos_embed``, written anew).

    Half of ``dim`` encodes the row, half the column; each half is ``[sin(p w_k), cos(p w_k)]`` with
    ``w_k = 1 / 10000^(k / (dim/4))``. Returns ``[1 + grid*grid, dim]`` (``[grid*grid, dim]``
    without ``cls_token``; the class token's row is zeros), patches in row-major order.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [grid, grid] each

    def encode(p: torch.Tensor) -> torch.Tensor:  # [L] -> [L, dim/2]
        angle = p[:, None] * omega[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    emb = torch.cat([encode(rows.flatten()), encode(cols.flatten())], dim=1)  # [L, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class DropPathEncoderLayer(nn.TransformerEncoderLayer):
    """A pre-norm ``nn.TransformerEncoderLayer`` whose two residual branches are dropped per sample
    with probability ``drop_path`` in training (stochastic depth, Huang et al. 2016; timm's
    ``DropPath``, which the MAE/MIMIR fine-tuning uses). Same parameters and names as its base
    class, so checkpoints load either way; identical to it in eval mode.
    """

    def __init__(self, *args, drop_path: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = drop_path

    def _drop(self, branch: torch.Tensor) -> torch.Tensor:  # [N, T, dim]
        if not self.training or self.drop_path == 0.0:
            return branch
        keep = 1.0 - self.drop_path
        mask = branch.new_empty(branch.shape[0], 1, 1).bernoulli_(keep)  # one draw per sample
        return branch * mask / keep

    def forward(self, src: torch.Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src  # [N, T, dim]; norm_first, as every block built here
        x = x + self._drop(self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal))
        return x + self._drop(self._ff_block(self.norm2(x)))


POS_EMBEDS = ("learned", "sincos")
POOLS = ("cls", "mean")


@register_arch("vit_tiny")
class ViTTiny(nn.Module):
    """A small ViT: patch embedding, position embeddings, a class token, pre-norm transformer
    encoder (``nn.TransformerEncoderLayer``), then a ReLU pre-logit layer (``features``,
    ``[N, dim]``) and a linear head.

    ``pos_embed``: ``"learned"`` (default) or ``"sincos"`` (fixed 2-D sine-cosine, MAE's; stored as
    a frozen parameter so checkpoints keep the same keys). ``pool``: the pre-logit input is the
    class token (``"cls"``, default) or the mean of the patch tokens (``"mean"``, MAE/MIMIR
    fine-tuning's ``global_pool``). ``drop_path``: stochastic-depth rate of every block (training
    only). ``patch_embed``/``pos_embed``/``blocks``/``norm`` are what a masked-autoencoder
    pre-training (MIMIR) reuses; ``forward_tokens`` runs the encoder on already-embedded tokens.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        mean: tuple[float, ...] = FASHION_MNIST_MEAN,
        std: tuple[float, ...] = FASHION_MNIST_STD,
        pos_embed: str = "learned",
        pool: str = "cls",
        drop_path: float = 0.0,
    ):
        super().__init__()
        _check_common(in_channels, num_classes, tuple(mean), tuple(std))
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.normalize = Normalize(tuple(mean), tuple(std))
        grid = image_size // patch_size
        self.num_patches = grid ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "sincos":
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid)[None], requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, dim) * 0.02)
        layer = dict(d_model=dim, nhead=heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                     batch_first=True, norm_first=True)
        self.blocks = nn.ModuleList(
            DropPathEncoderLayer(**layer, drop_path=drop_path * i / max(1, depth - 1)) if drop_path > 0
            else nn.TransformerEncoderLayer(**layer)
            for i in range(depth)  # rates rise linearly with depth, as timm's drop_path_rate
        )
        self.norm = nn.LayerNorm(dim)
        self.pre_logits = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, L, dim] (no cls)
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed[:, 1:]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:  # [N, L', dim] -> [N, 1+L', dim]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # -> [N, dim]
        h = self.forward_tokens(self.embed(x))  # [N, 1 + L, dim]
        pooled = h[:, 1:].mean(dim=1) if self.pool == "mean" else h[:, 0]  # [N, dim]
        return F.relu(self.pre_logits(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
