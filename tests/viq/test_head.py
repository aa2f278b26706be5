"""Quantization head: the proximal (stage 2-1) variant and the head-wise RoPE attention."""

import dataclasses

import pytest
import torch

from viq import ViQTokenizer
from viq.config import preset
from viq.quantize import LIMITS


@pytest.mark.parametrize("limit", [lim for lim in LIMITS if lim != "none"])
def test_proximal_head_limits_codes_and_trains(limit):
    cfg = preset("debug")
    cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, quantizer=limit))
    tok = ViQTokenizer(cfg).train()
    out = tok([torch.rand(3, 64, 96) * 2 - 1, torch.rand(3, 32, 32) * 2 - 1])
    assert out.head.indices is None
    assert out.head.codes.shape[-1] == cfg.head.bottleneck_dim
    if limit == "linf":  # every sub-token lies on the surface of the unit hypercube
        assert torch.allclose(out.head.codes.abs().amax(-1), torch.ones(()))
    if limit == "l2":
        assert torch.allclose(out.head.codes.norm(dim=-1), torch.ones(()), atol=1e-5)
    out.head.features.square().mean().backward()
    assert tok.head.project_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="proximal"):
        tok.encode([torch.rand(3, 32, 32)])


def test_subcodes_attend_only_to_their_own_head_across_patches():
    """Changing one patch's input reaches the other patches of the same image (through attention) and never
    another packed image. The continuous ("none") head shows it: random FSQ codes of a fresh head barely vary."""
    cfg = preset("debug")
    tok = ViQTokenizer(dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, quantizer="none"))).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 64, 64, generator=g) * 2 - 1
    a2 = a.clone()
    a2[:, :16, :16] = -a2[:, :16, :16]
    with torch.no_grad():
        x, y = tok([a, b]).head.features.split(16), tok([a2, b]).head.features.split(16)
    assert torch.equal(x[1], y[1])
    assert not torch.allclose(x[0][5:], y[0][5:])  # context reaches other patches of the same image


def test_calibration_spreads_fsq_inputs_over_the_levels():
    tok = ViQTokenizer.from_preset("debug", seed=0).eval()
    with torch.no_grad():  # a projection that shrinks the inputs, as a freshly re-initialised one can
        tok.head.project_in.weight.mul_(0.01)
        tok.head.project_in.bias.zero_()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) * 2 - 1 for _ in range(4)]
    before = {int(i) for c in tok.encode(images) for i in c.indices}
    out = tok(images)
    std = tok.head.calibrate_quantizer_input(out.trunk, out.grids, out.cu, out.max_len)
    assert (std < 0.2).all()  # the collapse being fixed: the inputs vary far less than one level
    z = tok.head.quantizer_input(out.trunk, out.grids, out.cu, out.max_len)[0].reshape(-1, tok.cfg.head.code_dim)
    assert torch.allclose(z.mean(0), torch.zeros(()), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(()), atol=1e-4)
    after = {int(i) for c in tok.encode(images) for i in c.indices}
    assert len(after) > 10 * len(before)


def test_fresh_head_keeps_patches_apart():
    # the head's Linear chain is initialised variance-preserving (viq.layers.init_linear): with
    # PyTorch's default init the per-patch variation all but vanished by the embedder's output
    tok = ViQTokenizer.from_preset("debug", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) * 2 - 1 for _ in range(4)]
    with torch.no_grad():
        feats = tok(images).head.features
    assert (feats.var(0).mean() / feats.pow(2).mean()) > 0.05
