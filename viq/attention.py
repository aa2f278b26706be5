"""One varlen attention entry point over packed sequences, with interchangeable backends.

Every attention layer of the encoder and the head runs over a batch of variable-size images packed
into one sequence; `cu_seqlens` delimits them and attention never crosses a boundary (block-diagonal).
The convention is flash-attn's: q, k, v are [N, H, Dh] and `cu_seqlens` is int32 [B + 1] =
[0, n_1, n_1 + n_2, ..., N]. `max_seqlen` (the longest segment) is passed in as a Python int, so
no backend has to read it from the device (a host sync in every layer otherwise).

Backends:
    "flash_attn"    flash_attn.flash_attn_varlen_func (optional package; CUDA, fp16/bf16)
    "torch_varlen"  torch.nn.attention.varlen.varlen_attn (torch >= 2.9; CUDA, fp16/bf16)
    "sdpa"          F.scaled_dot_product_attention with a dense block-diagonal boolean mask; any device
                    and dtype, O(N^2) memory: the CPU reference and the test oracle, not for long packs

Shape legend:
    N   total packed tokens        B   number of segments (sequences, images)
    H   heads                      Dh  head dimension
    q_NHD, k_NHD, v_NHD, out_NHD   [N, H, Dh];  cu_seqlens [B + 1];  mask_NN [N, N]
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except ImportError:  # optional dependency (the [flash] extra); a broken install counts as absent
    _flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn

    HAS_TORCH_VARLEN = True
    _TORCH_VARLEN_PARAMS = frozenset(inspect.signature(_torch_varlen_attn).parameters)
except ImportError:  # torch < 2.9
    _torch_varlen_attn = None
    HAS_TORCH_VARLEN = False
    _TORCH_VARLEN_PARAMS = frozenset()

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# The flash kernels handle head dims that are multiples of 8 up to 256.
_FLASH_MAX_HEAD_DIM = 256


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """Segment lengths [B] -> int32 cumulative offsets [B + 1] starting at 0."""
    lengths_B = torch.as_tensor(lengths, device=device)
    if lengths_B.numel() == 0:
        lengths_B = lengths_B.long()  # an empty list would otherwise come back as float
    if lengths_B.dim() != 1 or lengths_B.is_floating_point() or lengths_B.is_complex():
        raise ValueError(f"lengths must be a 1-D sequence of integers, got {lengths!r}")
    if lengths_B.numel() and bool((lengths_B < 0).any()):
        raise ValueError(f"lengths must be non-negative, got {lengths_B.tolist()}")
    cu = torch.zeros(lengths_B.numel() + 1, dtype=torch.int32, device=lengths_B.device)
    cu[1:] = torch.cumsum(lengths_B, 0)
    return cu


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int32 cumulative offsets [B + 1] -> segment lengths [B] (same dtype and device)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D and non-empty, got shape {tuple(cu_seqlens.shape)}")
    return cu_seqlens[1:] - cu_seqlens[:-1]


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """Backends usable on `device` (and, if given, for `dtype`), in order of preference."""
    device = torch.device(device)
    fused_ok = device.type == "cuda" and (dtype is None or dtype in _HALF_DTYPES)
    names = []
    if HAS_FLASH_ATTN and fused_ok:
        names.append("flash_attn")
    if HAS_TORCH_VARLEN and fused_ok:
        names.append("torch_varlen")
    names.append("sdpa")
    return names


def select_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The preferred backend for this device and dtype: flash_attn, then torch_varlen, then sdpa."""
    return available_backends(device, dtype)[0]


def _check_qkv(q_NHD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor) -> None:
    for name, t in (("q", q_NHD), ("k", k_NHD), ("v", v_NHD)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [N, H, Dh], got shape {tuple(t.shape)}")
    if k_NHD.shape != q_NHD.shape or v_NHD.shape != q_NHD.shape:
        raise ValueError(
            f"q, k, v shapes differ: q {tuple(q_NHD.shape)}, k {tuple(k_NHD.shape)}, v {tuple(v_NHD.shape)}"
        )
    if k_NHD.dtype != q_NHD.dtype or v_NHD.dtype != q_NHD.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q_NHD.dtype}, {k_NHD.dtype}, {v_NHD.dtype}")
    if k_NHD.device != q_NHD.device or v_NHD.device != q_NHD.device:
        raise ValueError(f"q, k, v devices differ: {q_NHD.device}, {k_NHD.device}, {v_NHD.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int, max_seqlen: int, check_values: bool) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    if not check_values:
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]} (cu_seqlens={values})")
    if values[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must end at N={n_tokens} (the packed length), got {values[-1]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest segment ({max(lengths)})")


# Above this many packed tokens the sdpa backend attends segment by segment instead of through one
# dense [N, N] mask: the mask's O(N^2) time and memory would otherwise dwarf the real O(sum n_i^2)
# work on long packs (a 16K-token LLM row, a step's worth of images), on the CPU in particular.
_DENSE_MAX_TOKENS = 1024


def _sdpa_segments(q_NHD, k_NHD, v_NHD, lengths: list[int], scale: float, causal: bool) -> torch.Tensor:
    outs = [
        F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=causal,
            scale=scale,
        )[0].transpose(0, 1)
        for q, k, v in zip(q_NHD.split(lengths), k_NHD.split(lengths), v_NHD.split(lengths), strict=True)
    ]
    return torch.cat(outs)


def _sdpa_varlen(q_NHD, k_NHD, v_NHD, cu_seqlens, scale: float, causal: bool) -> torch.Tensor:
    n_tokens = q_NHD.shape[0]
    lengths_B = lengths_from_cu_seqlens(cu_seqlens.to(device=q_NHD.device, dtype=torch.long))
    if n_tokens > _DENSE_MAX_TOKENS and lengths_B.numel() > 1:
        return _sdpa_segments(q_NHD, k_NHD, v_NHD, lengths_B.tolist(), scale, causal)
    segments = torch.arange(lengths_B.numel(), device=q_NHD.device)
    segment_N = torch.repeat_interleave(segments, lengths_B, output_size=n_tokens)
    mask_NN = segment_N[:, None] == segment_N[None, :]
    if causal:
        # Within one segment a global index order is the local order, so a global tril suffices.
        mask_NN = torch.tril(mask_NN)
    # [N, H, Dh] -> [1, H, N, Dh]: one "batch" whose mask forbids every cross-segment pair.
    out_1HND = F.scaled_dot_product_attention(
        q_NHD.transpose(0, 1)[None],
        k_NHD.transpose(0, 1)[None],
        v_NHD.transpose(0, 1)[None],
        attn_mask=mask_NN,
        scale=scale,
    )
    return out_1HND[0].transpose(0, 1)


def _pad_head_dim(t_NHD: torch.Tensor) -> torch.Tensor:
    # The fused kernels want Dh % 8 == 0; zero columns change neither q.k nor the kept part of the output.
    pad = -t_NHD.shape[-1] % 8
    return F.pad(t_NHD, (0, pad)) if pad else t_NHD


def _fused_varlen(backend, q_NHD, k_NHD, v_NHD, cu_seqlens, max_seqlen, scale, causal) -> torch.Tensor:
    head_dim = q_NHD.shape[-1]
    if head_dim > _FLASH_MAX_HEAD_DIM:
        raise ValueError(f"backend {backend!r} takes head dims up to {_FLASH_MAX_HEAD_DIM}, got {head_dim}")
    cu = cu_seqlens.to(device=q_NHD.device, dtype=torch.int32)
    q, k, v = (_pad_head_dim(t) for t in (q_NHD, k_NHD, v_NHD))
    if backend == "flash_attn":
        out = _flash_attn_varlen_func(
            q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=causal
        )
    else:
        out = _call_torch_varlen(q, k, v, cu, max_seqlen, scale, causal)
    return out[..., :head_dim]


def _call_torch_varlen(q, k, v, cu, max_seqlen, scale, causal) -> torch.Tensor:
    # The keyword API moved between torch releases: 2.9/2.10 take `is_causal`, later ones a
    # flash-style `window_size` ((-1, 0) is causal); `scale` arrived after 2.9. Adapt to what is there.
    kwargs = {}
    if "window_size" in _TORCH_VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in _TORCH_VARLEN_PARAMS:
        kwargs["is_causal"] = causal
    elif causal:
        raise ValueError("this torch's varlen_attn supports neither window_size nor is_causal")
    if "scale" in _TORCH_VARLEN_PARAMS:
        kwargs["scale"] = scale
    else:
        # Without a scale argument the kernel applies 1/sqrt of the width it sees (the padded one);
        # folding the ratio into q gives the requested scale.
        q = q * (scale * q.shape[-1] ** 0.5)
    return _torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def varlen_attention(
    q_NHD: torch.Tensor,
    k_NHD: torch.Tensor,
    v_NHD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
    check_values: bool | None = None,
) -> torch.Tensor:
    """Block-diagonal attention over packed segments; returns out_NHD in q's dtype.

    scale: softmax scale, default Dh ** -0.5. causal: each token attends to earlier tokens of its own
    segment only. backend: one of BACKENDS, or None for `select_backend(q.device, q.dtype)`.
    check_values: verify cu_seqlens' values (starts at 0, non-decreasing, ends at N, max_seqlen large
    enough). Reading them costs a host sync on an accelerator, so None checks only when cu_seqlens
    lives on the CPU; shapes and dtypes are always checked.
    """
    _check_qkv(q_NHD, k_NHD, v_NHD)
    if check_values is None:
        check_values = cu_seqlens.device.type == "cpu" if isinstance(cu_seqlens, torch.Tensor) else True
    _check_cu_seqlens(cu_seqlens, q_NHD.shape[0], max_seqlen, check_values)
    if backend is None:
        backend = select_backend(q_NHD.device, q_NHD.dtype)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    else:
        usable = available_backends(q_NHD.device, q_NHD.dtype)
        if backend not in usable:
            raise ValueError(
                f"attention backend {backend!r} is not available for device {q_NHD.device} and dtype "
                f"{q_NHD.dtype}; available: {usable}"
            )
    scale = q_NHD.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_NHD.shape[0] == 0:
        return torch.empty_like(q_NHD)
    if backend == "sdpa":
        return _sdpa_varlen(q_NHD, k_NHD, v_NHD, cu_seqlens, scale, causal)
    return _fused_varlen(backend, q_NHD, k_NHD, v_NHD, cu_seqlens, max_seqlen, scale, causal)
