"""Position-aware head-wise quantization head (viq-reference.md §2.2-2.4).

Shape legend: ``N`` packed patches, ``C`` width, ``E`` sub-tokens (codes) per patch, ``R`` the RoPE
attention width, ``d`` the code dimension (len(levels) for FSQ, the bottleneck width otherwise).
Encode path: LN (no affine) -> ViT blocks -> expand every patch into E sub-tokens (1-D channel groups:
sub-token k of patch n is channel slice k, at packed index E*n + k) -> per-sub-token MLP -> head-wise
RoPE blocks (sub-token k attends to sub-token k of the other patches of the same image) -> Linear to d
-> FSQ (stage 2-2) or an L-inf/L2/tanh limit (stage 2-1). As in the reference, the proximal head
(stage 2-1) has no head-wise blocks (HeadConfig.headwise_blocks). The decode path
(viq.decoder.CodeEmbedder) is token-local, so codes alone determine the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from viq.attention import varlen_attention
from viq.config import HeadConfig
from viq.decoder import CodeEmbedder
from viq.layers import Block, Mlp, init_linear, run_blocks, standardise_linear_
from viq.quantize import FSQ, apply_limit
from viq.rope2d import GoldenRoPE2d


class HeadwiseRoPEAttention(nn.Module):
    """Attention in which the E sub-tokens of a patch are the heads, with 2-D RoPE on the patch grid."""

    def __init__(self, dim: int, rope_dim: int, expand: int):
        super().__init__()
        self.expand = expand
        self.decrease_dim = nn.Linear(dim, rope_dim)
        self.qkv = nn.Linear(rope_dim, 3 * rope_dim)
        self.proj = nn.Linear(rope_dim, rope_dim)
        self.increase_dim = nn.Linear(rope_dim, dim)

    def forward(self, x_MC, cu, max_len, grids, rope: GoldenRoPE2d | None):
        n, e = x_MC.shape[0] // self.expand, self.expand
        z = self.decrease_dim(x_MC)
        q, k, v = self.qkv(z).view(n, e, 3, -1).unbind(2)
        if rope is not None:
            q, k = rope(q, k, grids)
        out = varlen_attention(q, k, v, cu, max_len)
        return self.increase_dim(self.proj(out.reshape(n * e, -1)))


class HeadwiseRoPEBlock(nn.Module):
    def __init__(self, dim: int, rope_dim: int, expand: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = HeadwiseRoPEAttention(dim, rope_dim, expand)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x_MC, cu, max_len, grids, rope):
        x_MC = x_MC + self.attn(self.norm1(x_MC), cu, max_len, grids, rope)
        return x_MC + self.mlp(self.norm2(x_MC))


class SubtokenPositions(nn.Module):
    """Learned absolute positions of the sub-tokens (HeadConfig.position="learnable"): a ``G x G`` table of
    E*C channels, bilinearly resized to every image's (h, w) grid as the encoder's table (viq-reference.md
    §1.3), so that sub-token k of patch n gets channel slice k of its patch's row."""

    def __init__(self, grid: int, expand: int, width: int):
        super().__init__()
        self.grid, self.width = grid, width
        self.table = nn.Parameter(torch.randn(1, grid * grid, expand * width) * 0.02)

    def forward(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Positions of the packed sub-tokens, ``[N*E, C]``."""
        g = self.grid
        table = self.table.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        parts = []
        for h, w in grids:
            if (h, w) == (g, g):
                parts.append(self.table[0])
            else:
                out = F.interpolate(table.float(), size=(h, w), mode="bilinear", align_corners=False)
                parts.append(out[0].flatten(1).t().to(self.table.dtype))
        return torch.cat(parts).reshape(-1, self.width)


@dataclass
class HeadOutput:
    features: torch.Tensor  # [N, C] what the MLLM, the MAP head and the pixel decoder see
    codes: torch.Tensor  # [N, E, d] quantized (or limited) codes
    indices: torch.Tensor | None  # [N, E] int64 FSQ indices; None for the proximal stage
    pre_quant: torch.Tensor  # [N, C] the normalised trunk features (feature-reconstruction target)


class QuantizationHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        c, e = cfg.width, cfg.expand
        self.pre_norm = nn.LayerNorm(c, eps=cfg.aux_norm_eps, elementwise_affine=False)
        self.pre_blocks = nn.ModuleList(
            Block(c, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps) for _ in range(cfg.pre_blocks)
        )
        self.expand_mlp = Mlp(c, e * c, e * c).init_variance_preserving()
        self.subtoken_mlp = Mlp(c, c, c).init_variance_preserving()
        blocks = cfg.headwise_blocks
        self.rope = GoldenRoPE2d(cfg.rope_dim, e, cfg.rope_angles) if blocks and cfg.position == "rope" else None
        self.positions = (SubtokenPositions(cfg.position_grid, e, c)
                          if blocks and cfg.position == "learnable" else None)
        self.rope_blocks = nn.ModuleList(
            HeadwiseRoPEBlock(c, cfg.rope_dim, e, cfg.rope_mlp_hidden, cfg.norm_eps) for _ in range(blocks)
        )
        self.project_in = init_linear(nn.Linear(c, cfg.code_dim))
        self.fsq = FSQ(cfg.levels) if cfg.quantizer == "fsq" else None
        self.embedder = CodeEmbedder(cfg)
        self.grad_checkpointing = False

    def quantizer_input(self, x_NC, grids, cu, max_len) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk features -> (z [N, E, d] before FSQ or the limit, normalised input [N, C])."""
        ckpt = self.grad_checkpointing and self.training
        pre = self.pre_norm(x_NC)
        x = run_blocks(self.pre_blocks, pre, cu, max_len, ckpt)
        n, c = x.shape
        x = self.subtoken_mlp(self.expand_mlp(x).reshape(n * self.cfg.expand, c))
        if self.positions is not None:
            x = x + self.positions(grids)
        for blk in self.rope_blocks:
            x = blk(x, cu, max_len, grids, self.rope)
        return self.project_in(x).reshape(n, self.cfg.expand, -1), pre

    @torch.no_grad()
    def calibrate_quantizer_input(self, x_NC, grids, cu, max_len, target_std: float = 1.0) -> torch.Tensor:
        """Rescale ``project_in`` so that z has zero mean and ``target_std`` per dimension on these features.

        A freshly initialised (or freshly re-initialised, after the proximal stage) ``project_in`` gives
        inputs that vary far less across patches than one FSQ level, so every patch falls on one code and
        the codebook collapses before training can spread it; this data-dependent start (as k-means
        initialises a VQ codebook) uses the levels from step one. Returns the per-dimension std before.
        """
        return standardise_linear_(self.project_in, self.quantizer_input(x_NC, grids, cu, max_len)[0], target_std)

    def quantize(self, x_NC, grids, cu, max_len) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Trunk features -> (codes [N, E, d], indices [N, E] or None, normalised input [N, C])."""
        z, pre = self.quantizer_input(x_NC, grids, cu, max_len)
        if self.fsq is not None:
            codes, indices = self.fsq(z)
            return codes, indices, pre
        return apply_limit(z, self.cfg.quantizer, 1e-6), None, pre

    def forward(self, x_NC, grids, cu, max_len) -> HeadOutput:
        codes, indices, pre = self.quantize(x_NC, grids, cu, max_len)
        return HeadOutput(self.embedder.forward_codes(codes), codes, indices, pre)
