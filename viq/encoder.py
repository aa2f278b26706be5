"""Native-resolution ViT over all images of a batch packed into one sequence.

Shape legend: ``B`` images, image ``i`` has an (h_i, w_i) patch grid and N_i = h_i*w_i patches,
``N`` = sum N_i packed tokens, ``D`` width, ``P`` = 3*p*p pixels per patch, ``cu`` int32 ``[B+1]``.
Each image gets the learned position table resized (bilinear) to its own grid, so a position encodes
the relative location in the image (viq-reference.md §1.3). Attention is block-diagonal per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from viq.config import EncoderConfig
from viq.image import pad_to_multiple
from viq.layers import AttentionPool, Block, run_blocks


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches_NP: torch.Tensor) -> torch.Tensor:
        # a strided conv on non-overlapping patches is a matmul on flattened (C, p, p) patches
        return F.linear(patches_NP, self.proj.weight.flatten(1), self.proj.bias)


def patchify(images: list[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """[3, H, W] images (zero-padded to multiples of the patch) -> packed patches ``[N, P]`` and grids."""
    patches, grids = [], []
    for x in images:
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"image of size {tuple(x.shape[1:])} has zero area")
        x = pad_to_multiple(x, patch_size)
        h, w = x.shape[1] // patch_size, x.shape[2] // patch_size
        p = x.reshape(3, h, patch_size, w, patch_size).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
        patches.append(p)
        grids.append((h, w))
    return torch.cat(patches), grids


def cu_from_grids(grids: list[tuple[int, int]], device) -> tuple[torch.Tensor, int]:
    lengths = [h * w for h, w in grids]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device), max(lengths)


@dataclass
class PackedTrunk:
    """The trunk output of a batch of images packed along one axis, with the layout every consumer needs."""

    trunk_ND: torch.Tensor  # before the final norm (the quantization head's input)
    grids: list[tuple[int, int]]  # per image (h, w) patch grid
    cu: torch.Tensor  # cumulative patch counts [B + 1] (varlen attention)
    max_len: int  # patches of the largest image


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.pos_grid * cfg.pos_grid, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, cfg.gelu) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn_pool = AttentionPool(d, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, cfg.gelu)
        self.grad_checkpointing = False

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table resized to an (h, w) grid, ``[h*w, D]``."""
        g, d = self.cfg.pos_grid, self.cfg.width
        if tuple(grid) == (g, g):
            return self.pos_embed[0]
        table = self.pos_embed.reshape(1, g, g, d).permute(0, 3, 1, 2)
        # antialias is only implemented for fp32 on CPU; the resize is tiny next to the trunk
        out = F.interpolate(table.float(), size=tuple(grid), mode="bilinear", align_corners=False,
                            antialias=self.cfg.pos_antialias)
        return out[0].flatten(1).t().to(self.pos_embed.dtype)

    def embed(self, patches_NP: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x_ND = self.patch_embed(patches_NP.to(self.pos_embed.dtype))
        return x_ND + torch.cat([self.position_embedding(g) for g in grids])

    def forward_packed(self, patches_NP: torch.Tensor, grids: list[tuple[int, int]],
                       cu: torch.Tensor, max_len: int) -> torch.Tensor:
        """Trunk output before the final norm, ``[N, D]`` (the quantization head's input)."""
        x_ND = self.embed(patches_NP, grids)
        return run_blocks(self.blocks, x_ND, cu, max_len, self.grad_checkpointing and self.training)

    def forward_pixels(self, images: list[torch.Tensor]) -> PackedTrunk:
        """Normalised [3, H, W] images of any sizes -> their packed trunk output, in one forward that
        computes only real patches (the images go to the encoder's device)."""
        patches, grids = patchify(list(images), self.cfg.patch_size)
        dev = self.pos_embed.device
        cu, max_len = cu_from_grids(grids, dev)
        return PackedTrunk(self.forward_packed(patches.to(dev), grids, cu, max_len), grids, cu, max_len)

    def forward_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised [3, H, W] images -> per-image final-norm features ``[h*w, D]``: the equivalent of
        transformers' ``last_hidden_state`` on the valid patches."""
        out = self.forward_pixels(images)
        return list(self.norm(out.trunk_ND).split([h * w for h, w in out.grids]))

    def pool(self, x_ND: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """MAP pooling of packed features (final norm applied here), one vector per image ``[B, D]``."""
        return self.attn_pool(self.norm(x_ND), cu)
