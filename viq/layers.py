"""Transformer building blocks shared by the encoder, the quantization head and the pixel decoder.

Shape legend: ``N`` packed tokens of all images of a batch, ``D`` width, ``B`` images,
``cu`` int32 cumulative sequence lengths ``[B+1]`` (one segment per image), ``max_len`` the longest
segment as a Python int (so no attention backend needs a host sync).
Parameter names follow timm's ViT (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``), which is also the layout of the released ViQ weights; see viq.convert for the key maps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from viq.attention import varlen_attention


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, gelu: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu)
        self.fc2 = nn.Linear(hidden, out if out is not None else dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def init_variance_preserving(self) -> Mlp:
        """He-normal fc1, LeCun-normal fc2, zero biases; see :func:`init_linear`."""
        init_linear(self.fc1, gain=2**0.5)
        init_linear(self.fc2)
        return self


@torch.no_grad()
def standardise_linear_(layer: nn.Linear, y: torch.Tensor, target_std: float = 1.0) -> torch.Tensor:
    """Rescale ``layer`` in place so that its outputs, ``y`` ``[..., out]`` on some data, get zero mean and
    ``target_std`` per output channel (a data-dependent start). Returns the per-channel std before."""
    y = y.reshape(-1, y.shape[-1]).float()
    mean, std = y.mean(0), y.std(0).clamp_min(1e-6)
    scale = target_std / std
    layer.weight.mul_(scale.to(layer.weight.dtype)[:, None])
    layer.bias.copy_(((layer.bias.float() - mean) * scale).to(layer.bias.dtype))
    return std


def init_linear(layer: nn.Linear, gain: float = 1.0) -> nn.Linear:
    """Weights N(0, gain^2 / fan_in), zero bias, for Linears chained without residuals or norms.

    PyTorch's default (uniform weights of variance 1/(3 fan_in) plus a bias of the same size) shrinks the
    token-dependent part of the signal about threefold per layer while the biases add a constant, so after
    the dozen Linears of the quantization head and code embedder every patch gives nearly the same
    feature and training from scratch stalls; this init keeps the per-token variation through the chain.
    """
    nn.init.normal_(layer.weight, std=gain / layer.in_features**0.5)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head self-attention over packed sequences, block-diagonal by ``cu``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_ND: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        n, d = x_ND.shape
        q, k, v = self.qkv(x_ND).view(n, 3, self.num_heads, d // self.num_heads).unbind(1)
        return self.proj(varlen_attention(q, k, v, cu, max_len).reshape(n, d))


class Block(nn.Module):
    """Pre-LN ViT block (no LayerScale, no drop-path)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6, gelu: str = "none"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, gelu=gelu)

    def forward(self, x_ND: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        x_ND = x_ND + self.attn(self.norm1(x_ND), cu, max_len)
        return x_ND + self.mlp(self.norm2(x_ND))


class ResidualMlp(nn.Module):
    """x + Mlp(LN(x)): the post-quantization refinement blocks."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def run_blocks(blocks: nn.ModuleList, x_ND: torch.Tensor, cu: torch.Tensor, max_len: int,
               checkpoint: bool = False) -> torch.Tensor:
    """Apply blocks in order; non-reentrant checkpointing so frozen inputs still give parameter grads."""
    for blk in blocks:
        if checkpoint and torch.is_grad_enabled():
            x_ND = torch.utils.checkpoint.checkpoint(blk, x_ND, cu, max_len, use_reentrant=False)
        else:
            x_ND = blk(x_ND, cu, max_len)
    return x_ND


def segment_ids(cu: torch.Tensor, n: int) -> torch.Tensor:
    """Image index of every packed token, ``[N]``."""
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=n)


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP) with one learned latent query per image, then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6, gelu: str = "none"):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, gelu=gelu)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x_ND: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """Packed features -> one pooled vector per image, ``[B, D]``."""
        n, d = x_ND.shape
        b, hd = len(cu) - 1, d // self.num_heads
        q = self.q(self.latent.reshape(1, d)).view(1, self.num_heads, 1, hd).expand(1, self.num_heads, b, hd)
        k, v = self.kv(x_ND).view(n, 2, self.num_heads, hd).permute(1, 2, 0, 3).unsqueeze(1)
        # each image's query sees only that image's tokens
        mask = segment_ids(cu, n)[None, :] == torch.arange(b, device=x_ND.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out[0].transpose(0, 1).reshape(b, d))
        return out + self.mlp(self.norm(out))
