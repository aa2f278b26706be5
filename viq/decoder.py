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
    (MLP E*C -> C), post MLP + residual MLPs, learned per-channel affine.

    ``project_out``, the concatenation of the E sub-codes and ``merge_mlp.fc1`` are linear with nothing
    between them, so the forward applies them as one folded map from the E*d raw code values to E*C
    (:meth:`folded_input_map`): 16*C^2 multiply-adds per patch become 4*d*4*C. The parameters stay unfolded
    (the file format and the released-weights loader do not change); a forward that needs their gradients
    folds them inside the graph, one that does not reuses a cached fold until a weight changes.
    """

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
        self._fold_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.fold = True  # False: the unfolded path, for measuring what the fold saves (viq bench)

    @property
    def codebook_size(self) -> int:
        if self.codebook is None:
            raise ValueError("a proximal-stage head has no codebook")
        return self.codebook.shape[0]

    def folded_input_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fc1(concat_k(P c_k + p)) = sum_k W_k P c_k + (b + sum_k W_k p)``, with ``W_k`` the k-th ``[E*C, C]``
        column block of fc1: the weight ``[E*C, E*d]`` and bias ``[E*C]`` of one map from the raw codes."""
        e, c = self.cfg.expand, self.cfg.width
        proj, fc1 = self.project_out, self.merge_mlp.fc1
        blocks_OEC = fc1.weight.reshape(e * c, e, c)
        weight = torch.einsum("okc,cd->okd", blocks_OEC, proj.weight).reshape(e * c, -1)
        return weight, fc1.bias + blocks_OEC.sum(1) @ proj.bias

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = (self.project_out.weight, self.project_out.bias, self.merge_mlp.fc1.weight, self.merge_mlp.fc1.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return self.folded_input_map()  # inside the graph: exact gradients for the unfolded parameters
        # the version counters move with every in-place update (optimizer step, load_state_dict, copy_)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params)
        if self._fold_cache is None or self._fold_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any later graph
                self._fold_cache = (key, self.folded_input_map())
        return self._fold_cache[1]

    def _partitioned(self) -> bool:
        # DeepSpeed ZeRO-3 gathers a submodule's weights only when that submodule runs: a fold that reads
        # them from here would see empty shards, so partitioned weights take the unfolded path
        return any(hasattr(t, "ds_id") for t in (self.project_out.weight, self.merge_mlp.fc1.weight))

    def forward_codes(self, codes_NEd: torch.Tensor) -> torch.Tensor:
        n = codes_NEd.shape[0]
        mlp = self.merge_mlp
        if self._partitioned() or not self.fold:
            x = mlp(self.project_out(codes_NEd.to(self.project_out.weight.dtype)).reshape(n, -1))
        else:
            weight, bias = self._folded()
            x = mlp.fc2(mlp.act(F.linear(codes_NEd.reshape(n, -1).to(weight.dtype), weight, bias)))
        x = self.post_mlp(x)
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
