"""Decode paths: codes -> per-patch features (CodeEmbedder), features -> pixels (PixelDecoder).

Shape legend: ``N`` packed patches, ``E`` codes per patch, ``d`` code dimension, ``C`` width,
``cu`` int32 ``[B+1]`` patch offsets of the packed images.
The CodeEmbedder is token-local (no attention, no context), which is what makes offline codes
possible: the indices of a patch alone determine its feature, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from viq.config import DecoderConfig, HeadConfig
from viq.layers import Block, Mlp, ResidualMlp, init_linear, run_blocks
from viq.quantize import FSQ


class CodeEmbedder(nn.Module):
    """Indices (or codes) -> features: codebook lookup, Linear d -> C, merge the E sub-codes of a patch
    (MLP E*C -> C), post MLP + residual MLPs, learned per-channel affine."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        c, e = cfg.width, cfg.expand
        if cfg.quantizer == "fsq":
            # persistent so that released bf16-rounded codebook values can be loaded (viq.convert)
            self.register_buffer("codebook", FSQ(cfg.levels).implicit_codebook())
        else:
            self.codebook = None
        self.project_out = init_linear(nn.Linear(cfg.code_dim, c))
        self.merge_mlp = Mlp(e * c, e * c, c).init_variance_preserving()
        self.post_mlp = Mlp(c, c, c).init_variance_preserving()
        self.post_blocks = nn.ModuleList(ResidualMlp(c, cfg.post_hidden, cfg.aux_norm_eps)
                                         for _ in range(cfg.post_blocks))
        self.affine_weight = nn.Parameter(torch.ones(c))
        self.affine_bias = nn.Parameter(torch.zeros(c))

    @property
    def codebook_size(self) -> int:
        if self.codebook is None:
            raise ValueError("a proximal-stage head has no codebook")
        return self.codebook.shape[0]

    def forward_codes(self, codes_NEd: torch.Tensor) -> torch.Tensor:
        n = codes_NEd.shape[0]
        x = self.project_out(codes_NEd.to(self.project_out.weight.dtype)).reshape(n, -1)
        x = self.post_mlp(self.merge_mlp(x))
        for blk in self.post_blocks:
            x = blk(x)
        return x * self.affine_weight + self.affine_bias

    def forward(self, indices_NE: torch.Tensor) -> torch.Tensor:
        """Integer indices ``[N, E]`` (or flat ``[N*E]``) -> features ``[N, C]``."""
        e = self.cfg.expand
        if indices_NE.dtype.is_floating_point:
            raise ValueError(f"indices must be integers, got dtype {indices_NE.dtype}")
        if indices_NE.numel() % e:
            raise ValueError(f"{indices_NE.numel()} indices is not a multiple of {e} codes per patch")
        flat = indices_NE.reshape(-1).long()
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"indices span [{lo}, {hi}], outside the codebook [0, {self.codebook_size})")
        return self.forward_codes(self.codebook[flat].reshape(-1, e, self.codebook.shape[1]))


class PixelDecoder(nn.Module):
    """Features -> image (or VAE latent): adapter (MLP, LN, ViT blocks per image) -> GroupNorm -> SiLU
    -> conv3x3 -> pixel shuffle. Each patch becomes an ``upscale x upscale`` tile of ``out_channels``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.adapter_mlp = Mlp(c, c, c).init_variance_preserving()
        self.adapter_norm = nn.LayerNorm(c, eps=1e-6)
        self.blocks = nn.ModuleList(Block(c, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.blocks))
        self.out_norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.out_conv = nn.Conv2d(c, cfg.out_channels * cfg.upscale**2, 3, padding=1)
        self.grad_checkpointing = False

    def forward(self, x_NC: torch.Tensor, grids: list[tuple[int, int]], cu: torch.Tensor,
                max_len: int) -> list[torch.Tensor]:
        """Packed features -> per-image outputs ``[out_channels, h*upscale, w*upscale]``."""
        x = self.adapter_norm(self.adapter_mlp(x_NC))
        x = run_blocks(self.blocks, x, cu, max_len, self.grad_checkpointing and self.training)
        outs = []
        for (h, w), part in zip(grids, x.split([h * w for h, w in grids]), strict=True):
            y = part.t().reshape(1, -1, h, w)
            y = self.out_conv(F.silu(self.out_norm(y)))
            outs.append(F.pixel_shuffle(y, self.cfg.upscale)[0])
        return outs


def reconstruction_loss(preds: list[torch.Tensor], targets: list[torch.Tensor],
                        perceptual: nn.Module | None = None, perceptual_weight: float = 1.0) -> torch.Tensor:
    """Mean squared error over all pixels of all images (+ an optional perceptual term)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    sq = sum(F.mse_loss(p.float(), t.float(), reduction="sum") for p, t in zip(preds, targets, strict=True))
    loss = sq / sum(t.numel() for t in targets)
    if perceptual is not None:
        loss = loss + perceptual_weight * torch.stack(
            [perceptual(p[None].float(), t[None].float()).mean() for p, t in zip(preds, targets, strict=True)]
        ).mean()
    return loss
