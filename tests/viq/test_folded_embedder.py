"""The code embedder's folded input map (project_out, concatenation and merge fc1 as one linear map) equals
the unfolded path in value and gradient, and its cache follows every change of the weights."""

from __future__ import annotations

import pytest
import torch

from viq.config import PRESETS, preset
from viq.decoder import CodeEmbedder


def _unfolded(emb: CodeEmbedder, codes_NEd: torch.Tensor) -> torch.Tensor:
    n = codes_NEd.shape[0]
    x = emb.merge_mlp(emb.project_out(codes_NEd.to(emb.project_out.weight.dtype)).reshape(n, -1))
    x = emb.post_mlp(x)
    for blk in emb.post_blocks:
        x = blk(x)
    return x * emb.affine_weight + emb.affine_bias


def _embedder(name: str, seed: int = 0) -> CodeEmbedder:
    torch.manual_seed(seed)
    emb = CodeEmbedder(preset(name).head)
    with torch.no_grad():  # non-zero biases, so that the folded bias is exercised
        for p in emb.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.1)
    return emb


def _codes(emb: CodeEmbedder, n: int = 64) -> torch.Tensor:
    idx = torch.randint(0, emb.codebook_size, (n, emb.cfg.expand), generator=torch.Generator().manual_seed(1))
    return emb.codebook[idx]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_folded_features_and_gradients_equal_the_unfolded_path(name):
    emb = _embedder(name)
    codes = _codes(emb).requires_grad_(True)  # the stages train through the codes (straight-through FSQ)
    folded = emb.forward_codes(codes)
    ref_codes = codes.detach().clone().requires_grad_(True)
    ref = _unfolded(emb, ref_codes)
    assert (folded - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(folded, [codes, *emb.parameters()], grad_out)
    want = torch.autograd.grad(ref, [ref_codes, *emb.parameters()], grad_out)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item())


def test_bf16_stays_within_bf16_rounding():
    emb = _embedder("debug").to(torch.bfloat16)
    codes = _codes(emb)
    with torch.no_grad():
        folded, ref = emb.forward_codes(codes).float(), _unfolded(emb, codes).float()
        exact = _unfolded(_embedder("debug"), _codes(_embedder("debug")))
    # both bf16 paths round differently; each stays within a few bf16 ulps (2^-8 relative) of the fp32 result
    scale = exact.abs().max()
    assert (folded - exact).abs().max() <= 0.05 * scale and (ref - exact).abs().max() <= 0.05 * scale


def test_a_frozen_embedder_folds_once_and_refolds_when_a_weight_changes():
    emb = _embedder("debug").requires_grad_(False)
    codes = _codes(emb)
    first = emb.forward_codes(codes)
    cached = emb._fold_cache[1][0]
    assert emb.forward_codes(codes).equal(first) and emb._fold_cache[1][0] is cached
    with torch.no_grad():
        emb.merge_mlp.fc1.weight.mul_(1.5)  # as an optimizer step or load_state_dict would, in place
    changed = emb.forward_codes(codes)
    assert emb._fold_cache[1][0] is not cached
    assert (changed - _unfolded(emb, codes)).abs().max() <= 1e-5 and not changed.equal(first)
    assert not any("fold" in k for k in emb.state_dict())  # the file format keeps the unfolded weights


def test_inference_mode_fold_is_usable_in_a_later_graph():
    emb = _embedder("debug").requires_grad_(False)
    codes = _codes(emb)
    with torch.inference_mode():
        emb.forward_codes(codes)
    trained = codes.clone().requires_grad_(True)
    emb.forward_codes(trained).sum().backward()  # the cached fold is a plain tensor, not an inference tensor
    assert trained.grad is not None and trained.grad.abs().sum() > 0
