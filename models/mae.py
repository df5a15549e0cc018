"""A masked autoencoder (MAE) for small images whose encoder *is* the ``vit_tiny`` classifier's.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (structure after
facebookresearch/mae ``models_mae.py``: ``forward_encoder`` / ``forward_decoder`` /
``forward_loss``): the image is cut into patches, a random 75% of them are dropped, a ViT encoder
sees only the visible patches, and a light transformer decoder, given the encoded visible tokens
plus a shared learned mask token at every dropped position, predicts the pixels of every patch;
the loss is the mean squared error on the *masked* patches only.

Choices for 28x28 Fashion-MNIST (documented in docs/MIMIR.md):

- patch size 4 on the unpadded 28x28 image (a 7x7 grid, L = 49; ``patch_size=2`` gives 14x14,
  L = 196), so the pre-trained encoder is exactly the classifier's encoder. With a mask ratio of
  0.75, ``int(L * 0.25)`` patches stay visible in *every* image (MAE's
  ``len_keep = int(L * (1 - mask_ratio))``).
- the encoder is a ``robustgate.models.archs.ViTTiny`` held as ``self.encoder``; its
  ``normalize``/``patch_embed``/``cls_token``/``pos_embed``/``blocks``/``norm`` are what MAE
  trains, so ``encoder_state_dict()`` loads into a ``build_arch("vit_tiny", ...)`` classifier
  with the same keys (only its ``pre_logits`` and ``head`` stay freshly initialised). The
  classifier's ``pre_logits``/``head`` inside ``self.encoder`` are frozen and unused here.
- position embeddings: fixed 2-D sin-cos in encoder and decoder (MAE's; ``pos_embed="learned"``
  gives the old learned ones).
- the decoder is sized to the encoder (``decoder_size``): MIMIR's ViT-T pairs a 192-d, 12-block
  encoder with a 128-d, 2-block decoder; the same ratios (2/3 of the width, 1/6 of the depth)
  give a 48-d, 1-block decoder beside a 64-d, 4-block encoder.
- inputs are [0, 1] pixels; normalization is inside the encoder. The reconstruction target is
  MAE's per-patch normalized pixels (``norm_pix_loss=True``, as the MIMIR scripts run it;
  ``False`` gives the clean [0, 1] pixels).

Known limits: MAE representations need fine-tuning to be useful for classification (linear
probing is weak, He et al. 2022 Sec. 4); on 28x28 images with 49 patches the task is much easier
than on ImageNet, so the benefit of pre-training is smaller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from robustgate.models.archs import FASHION_MNIST_MEAN, FASHION_MNIST_STD, ViTTiny, sincos_pos_embed_2d

# Parameter/buffer names of ViTTiny that the MAE trains and the classifier reuses.
ENCODER_KEYS = ("normalize.", "patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


class Masking(NamedTuple):
    """One random masking of a batch; 1 in ``mask`` means the patch is removed (as in MAE)."""

    ids_keep: torch.Tensor  # [N, K] int64, indices of visible patches (K = len_keep)
    ids_restore: torch.Tensor  # [N, L] int64, inverse of the shuffle
    mask: torch.Tensor  # [N, L] float32, 0 keep / 1 masked


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image, MAE's ``int(L * (1 - mask_ratio))``."""
    return int(num_patches * (1.0 - mask_ratio))


def random_masking(
    n: int, num_patches: int, mask_ratio: float, *, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Masking:
    """Per-image random masking by sorting uniform noise: exactly ``num_visible`` patches kept."""
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(n, num_patches, generator=generator).to(device)  # [N, L]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: first `keep` are visible
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    mask = torch.ones(n, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [N, L], back in patch order
    return Masking(ids_shuffle[:, :keep], ids_restore, mask)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order (as the conv patch embedding)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W] for a square grid."""
    n, L, _ = patches.shape
    g = int(round(L ** 0.5))
    x = patches.reshape(n, g, g, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, g * p, g * p)


def decoder_size(dim: int, depth: int) -> tuple[int, int, int]:
    """``(decoder_dim, decoder_depth, decoder_heads)`` in MIMIR's ViT-T proportions.

    ViT-T: encoder 192-d x 12 blocks, decoder 128-d x 2 blocks (2/3 of the width, 1/6 of the
    depth). The width is rounded to a multiple of 16 (>= 16) and split into heads of ~32 dims.
    """
    decoder_dim = max(16, 16 * round(dim * 2 / 3 / 16))
    return decoder_dim, max(1, round(depth / 6)), max(1, decoder_dim // 32)


def norm_pix_target(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch [.., P] minus its mean, over sqrt(var + eps).

    ``var`` is the unbiased variance over the patch's P values, as ``models_mae.py`` computes it.
    """
    mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mu) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE. pred/target [N, L, P], mask [N, L]."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(nn.Module):
    """MAE with a ``vit_tiny`` encoder. Keyword arguments are the configuration.

    Encoder arguments (``in_channels`` ... ``std``) are passed to ``ViTTiny`` unchanged, so the
    same values given to ``build_arch("vit_tiny", ...)`` make a classifier the encoder loads into.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mean: tuple[float, ...] = FASHION_MNIST_MEAN,
        std: tuple[float, ...] = FASHION_MNIST_STD,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        sized = decoder_size(dim, depth)  # None: MIMIR's ViT-T proportions
        decoder_dim = sized[0] if decoder_dim is None else decoder_dim
        decoder_depth = sized[1] if decoder_depth is None else decoder_depth
        decoder_heads = sized[2] if decoder_heads is None else decoder_heads
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by decoder_heads {decoder_heads}")
        if decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {decoder_depth}")
        self.config = dict(
            in_channels=in_channels, image_size=image_size, patch_size=patch_size, dim=dim, depth=depth,
            heads=heads, mlp_ratio=mlp_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
            decoder_heads=decoder_heads, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
            mean=tuple(mean), std=tuple(std), pos_embed=pos_embed,
        )
        self.patch_size, self.in_channels = patch_size, in_channels
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss

        # 1. Encoder: the classifier's own module (its pre_logits/head are not used by MAE).
        self.encoder = ViTTiny(
            in_channels=in_channels, image_size=image_size, patch_size=patch_size, dim=dim, depth=depth,
            heads=heads, mlp_ratio=mlp_ratio, mean=tuple(mean), std=tuple(std), pos_embed=pos_embed,
        )
        for module in (self.encoder.pre_logits, self.encoder.head):
            module.requires_grad_(False)
        self.num_patches = self.encoder.num_patches
        if num_visible(self.num_patches, mask_ratio) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {self.num_patches}")

        # 2. Decoder: a light transformer over all L positions.
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        if pos_embed == "sincos":
            grid = image_size // patch_size
            self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_dim, grid)[None], requires_grad=False)
        else:
            self.decoder_pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, decoder_dim) * 0.02)
        self.decoder_blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                decoder_dim, decoder_heads, int(decoder_dim * mlp_ratio), dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_channels)

    # -- masking ---------------------------------------------------------------------------
    def sample_masking(self, n: int, generator: torch.Generator | None = None) -> Masking:
        device = self.decoder_pos_embed.device
        return random_masking(n, self.num_patches, self.mask_ratio, generator=generator, device=device)

    # -- the three MAE stages ----------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, masking: Masking) -> torch.Tensor:
        """[N, C, H, W] pixels in [0, 1] -> latent [N, 1 + K, dim] (cls + visible tokens)."""
        tokens = self.encoder.embed(x)  # [N, L, dim], normalized inside, pos-embedded
        d = tokens.shape[-1]
        visible = torch.gather(tokens, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, K, dim]
        return self.encoder.forward_tokens(visible)  # [N, 1 + K, dim]

    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """latent [N, 1 + K, dim] -> predicted patches [N, L, p*p*C]."""
        h = self.decoder_embed(latent)  # [N, 1 + K, dd]
        n, k1, dd = h.shape
        fill = self.mask_token.expand(n, self.num_patches + 1 - k1, dd)  # [N, L - K, dd]
        seq = torch.cat([h[:, 1:], fill], dim=1)  # [N, L, dd], shuffled order
        seq = torch.gather(seq, 1, masking.ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
        h = torch.cat([h[:, :1], seq], dim=1) + self.decoder_pos_embed  # [N, 1 + L, dd]
        for block in self.decoder_blocks:
            h = block(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]  # [N, L, p*p*C]

    def forward_loss(self, target_images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE between ``pred`` [N, L, P] and the patches of ``target_images`` on masked patches."""
        target = patchify(target_images, self.patch_size)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            target = norm_pix_target(target)
        return masked_mse(pred, target, mask)

    def forward(
        self, x: torch.Tensor, x_in: torch.Tensor | None = None, masking: Masking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Masking, torch.Tensor]:
        """Reconstructs clean ``x`` from encoder input ``x_in`` (default ``x``; MIMIR: ``x + delta``).

        Returns ``(loss, pred [N, L, P], masking, latent [N, 1 + K, dim])``.
        """
        if x.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
        if masking is None:
            masking = self.sample_masking(x.shape[0])
        latent = self.forward_encoder(x if x_in is None else x_in, masking)
        pred = self.forward_decoder(latent, masking)
        return self.forward_loss(x, pred, masking.mask), pred, masking, latent

    # -- transfer to the classifier ----------------------------------------------------------
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under ``vit_tiny`` classifier names (no ``pre_logits``/``head``)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items() if k.startswith(ENCODER_KEYS)}

    def classifier_kwargs(self) -> dict:
        """``build_arch("vit_tiny", num_classes=K, **classifier_kwargs())`` matches this encoder."""
        c = self.config
        return {k: c[k] for k in ("in_channels", "image_size", "patch_size", "dim", "depth", "heads", "mlp_ratio",
                                  "mean", "std", "pos_embed")}


def mae_vit_tiny(**kwargs) -> MaskedAutoencoder:
    """ViT-Tiny widths (dim 192, depth 12, 3 heads), decoder 128-d x 2 blocks (``decoder_size``, MIMIR's ViT-T)."""
    return MaskedAutoencoder(**kwargs)
