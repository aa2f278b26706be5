"""Tests for viq.attention: every backend against per-sequence SDPA, isolation, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from viq import attention
from viq.attention import (
    BACKENDS,
    available_backends,
    cu_seqlens_from_lengths,
    lengths_from_cu_seqlens,
    select_backend,
    varlen_attention,
)

CPU = torch.device("cpu")
# (segment lengths, head dim): single segment, all length-1, mixed, zero-length, Dh not a power of 2.
CASES = [([5], 12), ([1, 1, 1], 8), ([3, 1, 7, 2], 12), ([1, 9], 20), ([4, 0, 3], 6), ([2, 6, 1], 16)]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_attention(q_NHD, k_NHD, v_NHD, lengths, scale=None, causal=False):
    """Per-sequence SDPA in a Python loop over segments: the oracle."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        start += n
        if n == 0:
            continue
        out_HND = F.scaled_dot_product_attention(
            q_NHD[sl].transpose(0, 1), k_NHD[sl].transpose(0, 1), v_NHD[sl].transpose(0, 1),
            is_causal=causal, scale=scale,
        )
        outs.append(out_HND.transpose(0, 1))
    return torch.cat(outs, 0)


def make_qkv(lengths, heads=3, head_dim=12, dtype=torch.float32, device=CPU, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = sum(lengths)
    return [torch.randn(n, heads, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", available_backends(CPU))
@pytest.mark.parametrize("lengths, head_dim", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_per_sequence_sdpa(backend, lengths, causal, head_dim):
    q, k, v = make_qkv(lengths, head_dim=head_dim)
    cu = cu_seqlens_from_lengths(lengths)
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal, backend=backend)
    ref = reference_attention(q, k, v, lengths, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_causal_differs_from_full_and_first_token_attends_to_itself():
    q, k, v = make_qkv([4, 3])
    cu = cu_seqlens_from_lengths([4, 3])
    full = varlen_attention(q, k, v, cu, 4)
    causal = varlen_attention(q, k, v, cu, 4, causal=True)
    assert not torch.allclose(full, causal)
    # The first token of each segment sees only itself under the causal mask.
    torch.testing.assert_close(causal[[0, 4]], v[[0, 4]], atol=1e-6, rtol=0)


def test_custom_scale():
    lengths = [3, 5]
    q, k, v = make_qkv(lengths, head_dim=10)
    out = varlen_attention(q, k, v, cu_seqlens_from_lengths(lengths), 5, scale=0.05)
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths, scale=0.05), atol=1e-5, rtol=0)
    default = varlen_attention(q, k, v, cu_seqlens_from_lengths(lengths), 5)
    assert not torch.allclose(out, default)


@pytest.mark.parametrize("backend", available_backends(CPU))
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_per_sequence_sdpa(backend, causal):
    lengths = [3, 1, 6]
    leaves = [t.requires_grad_() for t in make_qkv(lengths, head_dim=6, seed=1)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    weight = torch.randn(sum(lengths), 3, 6, generator=torch.Generator().manual_seed(2))
    out = varlen_attention(*leaves, cu_seqlens_from_lengths(lengths), 6, causal=causal, backend=backend)
    (out * weight).sum().backward()
    (reference_attention(*ref_leaves, lengths, causal=causal) * weight).sum().backward()
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=True):
        assert got.grad.abs().sum() > 0, name
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=0, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", available_backends(CPU))
@pytest.mark.parametrize("causal", [False, True])
def test_no_leakage_between_segments(backend, causal):
    lengths = [4, 5, 2]
    q, k, v = make_qkv(lengths)
    cu = cu_seqlens_from_lengths(lengths)
    out = varlen_attention(q, k, v, cu, 5, causal=causal, backend=backend)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[4:9] = torch.randn(5, 3, 12) * 100
    out2 = varlen_attention(q2, k2, v2, cu, 5, causal=causal, backend=backend)
    assert torch.equal(out[:4], out2[:4]) and torch.equal(out[9:], out2[9:])
    assert not torch.allclose(out[4:9], out2[4:9])


def test_low_precision_keeps_dtype_on_cpu():
    lengths = [3, 4]
    q, k, v = make_qkv(lengths, dtype=torch.bfloat16)
    out = varlen_attention(q, k, v, cu_seqlens_from_lengths(lengths), 4)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(*(t.float() for t in (q, k, v)), lengths)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_length_helpers_round_trip():
    cu = cu_seqlens_from_lengths([3, 0, 5])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8]
    assert lengths_from_cu_seqlens(cu).tolist() == [3, 0, 5]
    assert cu_seqlens_from_lengths(torch.tensor([2, 2])).tolist() == [0, 2, 4]
    assert cu_seqlens_from_lengths([]).tolist() == [0]
    with pytest.raises(ValueError, match="non-negative"):
        cu_seqlens_from_lengths([2, -1])
    with pytest.raises(ValueError, match="integers"):
        cu_seqlens_from_lengths([1.5, 2.0])


@pytest.mark.parametrize(
    "cu, max_seqlen, match",
    [
        ([1, 4, 9], 5, "start at 0"),
        ([0, 6, 4, 9], 6, "non-decreasing"),
        ([0, 4, 8], 5, "end at N=9"),
        ([0, 4, 10], 6, "end at N=9"),
        ([0, 4, 9], 3, "max_seqlen=3"),
        ([0], 5, "at least 2"),
    ],
)
def test_bad_cu_seqlens(cu, max_seqlen, match):
    q, k, v = make_qkv([4, 5])
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max_seqlen)


def test_bad_cu_seqlens_shape_dtype_and_max_seqlen_type():
    q, k, v = make_qkv([4, 5])
    with pytest.raises(ValueError, match="1-D"):
        varlen_attention(q, k, v, torch.tensor([[0, 4, 9]], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="integers"):
        varlen_attention(q, k, v, torch.tensor([0.0, 4.0, 9.0]), 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu_seqlens_from_lengths([4, 5]), torch.tensor(5))


def test_bad_qkv_shapes():
    q, k, v = make_qkv([4, 5])
    cu = cu_seqlens_from_lengths([4, 5])
    with pytest.raises(ValueError, match="shapes differ"):
        varlen_attention(q, k[:, :2], v, cu, 5)
    with pytest.raises(ValueError, match=r"q must be \[N, H, Dh\]"):
        varlen_attention(q[None], k, v, cu, 5)
    with pytest.raises(ValueError, match="dtypes differ"):
        varlen_attention(q, k.double(), v, cu, 5)


def test_backend_selection_and_unavailable_request():
    assert available_backends(CPU) == ["sdpa"]
    assert select_backend(CPU, torch.float32) == "sdpa"
    assert select_backend(torch.device("cuda"), torch.float32) == "sdpa"
    expected_cuda_half = "flash_attn" if attention.HAS_FLASH_ATTN else (
        "torch_varlen" if attention.HAS_TORCH_VARLEN else "sdpa"
    )
    assert select_backend("cuda", torch.bfloat16) == expected_cuda_half
    assert set(available_backends("cuda")) <= set(BACKENDS)
    q, k, v = make_qkv([2, 3])
    cu = cu_seqlens_from_lengths([2, 3])
    with pytest.raises(ValueError, match=r"'flash_attn' is not available.*available: \['sdpa'\]"):
        varlen_attention(q, k, v, cu, 3, backend="flash_attn")
    with pytest.raises(ValueError, match="'torch_varlen' is not available"):
        varlen_attention(q, k, v, cu, 3, backend="torch_varlen")
    with pytest.raises(ValueError, match="'xformers'"):
        varlen_attention(q, k, v, cu, 3, backend="xformers")


# --- CUDA (bf16) -----------------------------------------------------------------------------------


def _cuda_half_backends():
    return available_backends("cuda", torch.bfloat16) if torch.cuda.is_available() else ["sdpa"]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", _cuda_half_backends())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 96, 20])
def test_cuda_bf16_matches_fp32_reference(backend, causal, head_dim):
    lengths = [37, 1, 256, 5, 129]
    q, k, v = make_qkv(lengths, heads=4, head_dim=head_dim, dtype=torch.bfloat16, device="cuda")
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal, backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = reference_attention(*(t.float() for t in (q, k, v)), lengths, causal=causal)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", _cuda_half_backends())
def test_cuda_bf16_gradients_and_isolation(backend):
    lengths = [40, 3, 77]
    q, k, v = (t.requires_grad_() for t in make_qkv(lengths, heads=2, head_dim=32, dtype=torch.bfloat16,
                                                     device="cuda"))
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    weight = torch.randn(sum(lengths), 2, 32, device="cuda")
    out = varlen_attention(q, k, v, cu, 77, backend=backend)
    (out.float() * weight).sum().backward()
    (reference_attention(*ref_leaves, lengths) * weight).sum().backward()
    for got, want in zip((q, k, v), ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=5e-2)
    with torch.no_grad():  # both calls without autograd, so kernel choice cannot differ between them
        out1 = varlen_attention(q, k, v, cu, 77, backend=backend)
        q2, k2 = q.clone(), k.clone()
        q2[40:43] = 50.0
        k2[40:43] = -50.0
        out2 = varlen_attention(q2, k2, v, cu, 77, backend=backend)
    assert torch.equal(out1[:40], out2[:40]) and torch.equal(out1[43:], out2[43:])
    assert not torch.equal(out1[40:43], out2[40:43])


# --- fused-backend adapters, exercised on CPU with stand-in kernels ----------------------------------


def _fake_kernel(calls, causal_from):
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(kwargs)
        assert q.shape[-1] % 8 == 0 and cu_q.dtype == torch.int32 and cu_k is cu_q
        lengths = lengths_from_cu_seqlens(cu_q).tolist()
        assert max_q == max_k >= max(lengths)
        scale = kwargs.get("scale", kwargs.get("softmax_scale", q.shape[-1] ** -0.5))
        return reference_attention(q, k, v, lengths, scale=scale, causal=causal_from(kwargs))

    return kernel


@pytest.mark.parametrize(
    "params, causal_from",
    [
        ({"window_size", "scale"}, lambda kw: tuple(kw["window_size"]) == (-1, 0)),  # torch >= 2.11
        ({"is_causal", "scale"}, lambda kw: kw["is_causal"]),  # torch 2.10
        ({"is_causal"}, lambda kw: kw["is_causal"]),  # torch 2.9: no scale argument
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_varlen_adapter(monkeypatch, params, causal_from, causal):
    calls = []
    monkeypatch.setattr(attention, "_torch_varlen_attn", _fake_kernel(calls, causal_from))
    monkeypatch.setattr(attention, "_TORCH_VARLEN_PARAMS", frozenset(params))
    lengths = [3, 1, 6]
    q, k, v = make_qkv(lengths, head_dim=12)  # padded to 16 inside the adapter
    cu = cu_seqlens_from_lengths(lengths)
    out = attention._fused_varlen("torch_varlen", q, k, v, cu, 6, 0.3, causal)
    assert out.shape == q.shape and len(calls) == 1
    assert ("scale" in calls[0]) == ("scale" in params)
    ref = reference_attention(q, k, v, lengths, scale=0.3, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_adapter(monkeypatch, causal):
    calls = []
    monkeypatch.setattr(attention, "_flash_attn_varlen_func", _fake_kernel(calls, lambda kw: kw["causal"]))
    lengths = [5, 2]
    q, k, v = make_qkv(lengths, head_dim=20)
    out = attention._fused_varlen("flash_attn", q, k, v, cu_seqlens_from_lengths(lengths), 5, 0.2, causal)
    assert calls[0]["softmax_scale"] == 0.2 and calls[0]["dropout_p"] == 0.0
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths, 0.2, causal), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="head dims up to 256, got 264"):
        big = torch.zeros(7, 1, 264)
        attention._fused_varlen("flash_attn", big, big, big, cu_seqlens_from_lengths(lengths), 5, 0.2, causal)
