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


def _head(position: str, seed: int = 0, **kw):
    cfg = preset("debug")
    head = dataclasses.replace(cfg.head, position=position, **kw)
    return ViQTokenizer.from_preset("debug", seed=seed, head=head).eval()


def test_proximal_head_has_no_headwise_blocks_unless_asked():
    prox = _head("rope", quantizer="linf")
    assert len(prox.head.rope_blocks) == 0 and prox.head.rope is None
    assert not any(k.startswith("head.rope_blocks") for k in prox.state_dict())
    old = _head("rope", quantizer="linf", proximal_rope_blocks=True)  # the variant trained before
    assert len(old.head.rope_blocks) == old.cfg.head.rope_blocks == 1
    assert len(_head("rope").head.rope_blocks) == 1  # the FSQ head always has them


@pytest.mark.parametrize("position", ["rope", "learnable", "none"])
def test_every_position_variant_encodes(position):
    tok = _head(position)
    assert (tok.head.positions is not None) == (position == "learnable")
    assert (tok.head.rope is not None) == (position == "rope")
    codes = tok.encode([torch.rand(3, 64, 96) * 2 - 1, torch.rand(3, 32, 32) * 2 - 1])
    assert [c.indices.numel() for c in codes] == [4 * 6 * 4, 2 * 2 * 4]


def _z(tok, x_NC, grid):
    cu = torch.tensor([0, x_NC.shape[0]], dtype=torch.int32)
    with torch.no_grad():
        return tok.head.quantizer_input(x_NC, [grid], cu, x_NC.shape[0])[0]


def test_only_the_position_free_head_is_permutation_equivariant():
    """Shuffling the patches of an image shuffles the FSQ inputs the same way without positions; RoPE and a
    learned table tie them to their places. The learned table at zero is exactly the position-free head."""
    grid = (4, 6)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    for position, equivariant in [("none", True), ("rope", False), ("learnable", False)]:
        tok = _head(position)
        same = torch.allclose(_z(tok, x[perm], grid), _z(tok, x, grid)[perm], atol=1e-5)
        assert same == equivariant, position
    learnable, none = _head("learnable"), _head("none")
    state = {k: v for k, v in learnable.state_dict().items() if not k.startswith("head.positions.")}
    none.load_state_dict(state, strict=True)
    assert not torch.allclose(_z(learnable, x, grid), _z(none, x, grid))
    with torch.no_grad():
        learnable.head.positions.table.zero_()
    torch.testing.assert_close(_z(learnable, x, grid), _z(none, x, grid))


def test_learned_positions_resize_to_every_grid():
    tok = _head("learnable", position_grid=4)
    pos = tok.head.positions
    e, c = tok.cfg.head.expand, tok.cfg.head.width
    own = pos([(4, 4)])
    assert own.shape == (16 * e, c) and torch.equal(own, pos.table[0].reshape(-1, c))  # its own grid: as is
    out = pos([(2, 3), (4, 4)])
    assert out.shape == ((6 + 16) * e, c) and torch.equal(out[6 * e:], own)
    # a 1x1 grid samples the table's centre (bilinear, no antialias: the 4 middle cells of 4x4), per slice
    centre = pos.table[0].reshape(4, 4, e * c)[1:3, 1:3].mean((0, 1))
    torch.testing.assert_close(pos([(1, 1)]).reshape(e * c), centre, atol=1e-6, rtol=0)
