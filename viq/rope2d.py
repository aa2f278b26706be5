"""Golden-angle 2-D rotary embedding of the quantization head (viq-reference.md §2.4).

Shape legend: ``N`` patches of one or more packed images, ``E`` heads (the sub-codes of a patch),
``F`` = head_dim/2 frequency slots, ``R`` = head_dim.
Every (head, slot) pair rotates along its own direction in the image plane (golden-angle steps), with
log-spaced magnitudes from 0.2 to 20 and the first quarter of the slots left unrotated. Positions are
normalised coordinates spanning [-sqrt(w/h), sqrt(w/h)] x [-sqrt(h/w), sqrt(h/w)] whatever the grid, so
a finer grid samples the same extent more densely.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GOLDEN_STEP = math.pi * (math.sqrt(5.0) - 1.0) / 2.0
ZERO_FRACTION = 0.25
MIN_FREQ, MAX_FREQ = 0.2, 20.0


def golden_frequencies(head_dim: int, n_heads: int) -> torch.Tensor:
    """Frequency vectors ``[E, F, 2]`` (x and y components), float32.

    Computed step by step in float32 exactly as the released model does: its directions are the
    float32 cosine/sine of float32 phases of up to ~600 rad, which differ from float64 phases by up to
    6e-4 in the frequencies, far above float32 noise in the FSQ inputs.
    """
    f32 = torch.float32
    slots = head_dim // 2
    n_zero = round(ZERO_FRACTION * slots)
    steps = torch.linspace(0, 1, slots - n_zero, dtype=f32)
    mags = torch.cat([torch.zeros(n_zero, dtype=f32), MIN_FREQ * (MAX_FREQ / MIN_FREQ) ** steps])
    phase = torch.arange(n_heads * slots).to(f32).view(n_heads, slots) * GOLDEN_STEP
    return mags.unsqueeze(-1) * torch.stack([phase.cos(), phase.sin()], dim=-1)


def grid_coordinates(h: int, w: int) -> torch.Tensor:
    """Normalised (x, y) of every patch of an (h, w) grid in raster order, ``[h*w, 2]`` float32."""
    # fp32 like the released model, so angles agree with its weights to the last bit where possible
    ax = math.sqrt(w / h)
    ay = math.sqrt(h / w)
    xs = torch.linspace(-ax, ax, w, dtype=torch.float32)
    ys = torch.linspace(-ay, ay, h, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


class GoldenRoPE2d(nn.Module):
    def __init__(self, head_dim: int, n_heads: int, angles: str = "float32"):
        super().__init__()
        if angles not in ("float32", "activation"):
            raise ValueError(f"rope angles must be 'float32' or 'activation', got {angles!r}")
        self.angles = angles
        # a plain attribute, not a buffer: casting the model to bf16 must not round the frequencies
        self.freqs = golden_frequencies(head_dim, n_heads)
        self._cache: dict[tuple, torch.Tensor] = {}

    def theta(self, grids: list[tuple[int, int]], device) -> torch.Tensor:
        """Rotation angles of packed patches, ``[N, E, F]`` float32 (cached per grid list)."""
        key = (tuple(map(tuple, grids)), str(device))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            pos = torch.cat([grid_coordinates(h, w) for h, w in grids]).to(device)
            # two rounded products and one sum, as the released model computes them (no fused matmul)
            self._cache[key] = (self.freqs.to(device) * pos[:, None, None, :]).sum(dim=-1)
        return self._cache[key]

    def forward(self, q_NER: torch.Tensor, k_NER: torch.Tensor, grids: list[tuple[int, int]]):
        theta = self.theta(grids, q_NER.device)
        if self.angles == "activation":
            # the released weights were trained with angles rounded to the activation dtype (bf16)
            theta = theta.to(q_NER.dtype)
        cos, sin = theta.cos().float(), theta.sin().float()
        return _rotate(q_NER, cos, sin), _rotate(k_NER, cos, sin)


def _rotate(x_NER: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x_NER.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x_NER.dtype)
