"""The ``viq_varlen`` attention implementation for Hugging Face causal LMs: padding-free packed rows
through ``viq.attention.varlen_attention`` (flash-attn or torch's varlen kernel on a GPU, per-segment
SDPA on the CPU), so a packed row costs sum(n_i^2) attention, never T^2, without the flash-attn package.

Segment boundaries of a packed row [1, T] come from the ``cu_seq_lens_q`` / ``max_length_q`` keyword
arguments when the caller passes them (no host sync: the flash-attention convention transformers uses),
else from ``position_ids`` restarting at 0. A padded batch [B, L] with a 2-D ``attention_mask`` is
un-padded to its valid tokens, as transformers' flash_attention_2 path does.

Shapes: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (grouped-query heads repeated to Hq), out ``[B, T, Hq, D]``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from viq.attention import varlen_attention

NAME = "viq_varlen"


def _boundaries(kwargs: dict, position_ids: torch.Tensor | None, n_tokens: int, device):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    if position_ids is None:
        return torch.tensor([0, n_tokens], dtype=torch.int32, device=device), n_tokens
    starts = torch.nonzero(position_ids.reshape(-1) == 0).reshape(-1).tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, n_tokens]
    max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return torch.tensor(bounds, dtype=torch.int32, device=device), max_len


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout, got {dropout}")
    batch, heads, n, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(1, 2).reshape(batch * n, heads, dim) for t in (query, key, value))
    if attention_mask is None and batch == 1:
        cu, max_len = _boundaries(kwargs, kwargs.get("position_ids"), n, q.device)
        out = varlen_attention(q, k, v, cu, max_len, scale=scaling, causal=True, check_values=False)
        return out.reshape(batch, n, heads, dim), None
    if attention_mask is None:
        attention_mask = torch.ones(batch, n, dtype=torch.bool, device=q.device)
    # right- or left-padded rows: attend over each row's valid tokens only, then put them back in place
    valid = attention_mask.reshape(-1).bool()
    lengths = attention_mask.bool().sum(-1)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu[1:] = lengths.cumsum(0)
    idx = torch.nonzero(valid).reshape(-1)
    out_valid = varlen_attention(
        q[idx], k[idx], v[idx], cu, int(lengths.max()), scale=scaling, causal=True, check_values=False
    )
    out = torch.zeros_like(q).index_copy(0, idx, out_valid)
    return out.reshape(batch, n, heads, dim), None


def register() -> str:
    """Make ``attn_implementation="viq_varlen"`` available to transformers models (idempotent)."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
