"""FSQ and the proximal bottleneck: parity with vector-quantize-pytorch, round trips, bf16, gradients."""

from __future__ import annotations

import pytest
import torch

from viq.quantize import FSQ, FSQ_PRESETS, apply_limit, fsq_levels

PRESETS = sorted(FSQ_PRESETS)


def _reference_constants(levels: tuple[int, ...], eps: float = 1e-3):
    """Per-dimension (half_l, off, shift, half_width), written out from reference doc section 2.5."""
    half_l = torch.tensor([(L - 1) * (1 + eps) / 2 for L in levels], dtype=torch.float32)
    off = torch.tensor([0.5 if L % 2 == 0 else 0.0 for L in levels], dtype=torch.float32)
    half_width = torch.tensor([L // 2 for L in levels], dtype=torch.float32)
    return half_l, off, torch.atanh(off / half_l), half_width


def _grid_values(L: int) -> torch.Tensor:
    return (torch.arange(L, dtype=torch.float32) - L // 2) / (L // 2)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("preset", PRESETS)
def test_parity_with_vector_quantize_pytorch(preset):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    levels = FSQ_PRESETS[preset]
    # Options written out so the reference runs the same math as ours even if its defaults change:
    # the tanh bound with eps 1e-3 (not the floor-based symmetric one), no noise dropout, no rotation,
    # no hard clamp, fp32 quantization, and dim == len(levels) so it builds no projections.
    ref = vqp.FSQ(
        levels=list(levels),
        dim=len(levels),
        preserve_symmetry=False,
        noise_dropout=0.0,
        bound_hard_clamp=False,
        orthogonal_rotation=False,
        force_quantization_f32=True,
        return_indices=True,
    ).eval()
    assert not ref.has_projections
    ours = FSQ(levels)
    torch.manual_seed(0)
    z = 2.0 * torch.randn(4, 512, len(levels))  # reference wants (batch, seq, dim)
    ref_codes, ref_indices = ref(z)
    codes, indices = ours(z)
    assert codes.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(codes, ref_codes)
    assert torch.equal(indices, ref_indices.long())
    assert torch.equal(ours.implicit_codebook(), ref.implicit_codebook)
    # bf16 input: both up-cast, quantize in fp32 and cast the codes back after rounding.
    ref_codes_bf, ref_indices_bf = ref(z.bfloat16())
    codes_bf, indices_bf = ours(z.bfloat16())
    assert codes_bf.dtype == ref_codes_bf.dtype == torch.bfloat16
    assert torch.equal(codes_bf, ref_codes_bf) and torch.equal(indices_bf, ref_indices_bf.long())
    # The input reaches every level of every dimension, so the comparison covers the whole grid.
    for j, L in enumerate(levels):
        assert ours.levels_from_indices(indices)[..., j].unique().tolist() == list(range(L))


# ---------------------------------------------------------------- presets, construction


def test_presets_and_sizes():
    sizes = {name: FSQ(name).codebook_size for name in PRESETS}
    assert sizes == {"2k": 2304, "4k": 4096, "8k": 8192, "16k": 15360, "64k": 64000}
    assert FSQ("64k").dim == 6 and FSQ("16k").dim == 5
    assert fsq_levels([8, 5, 3]) == (8, 5, 3)
    assert fsq_levels("16k") == (8, 8, 8, 6, 5)


def test_buffers_are_int64_non_persistent_and_no_parameters():
    fsq = FSQ("16k")
    assert list(fsq.parameters()) == []
    assert fsq.state_dict() == {}
    assert fsq.basis.tolist() == [1, 8, 64, 512, 3072]
    fsq = fsq.to(torch.bfloat16)
    assert fsq.levels.dtype == torch.int64 and fsq.basis.dtype == torch.int64


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trips_over_whole_codebook(preset):
    fsq = FSQ(preset)
    book = fsq.implicit_codebook()
    arange = torch.arange(fsq.codebook_size)
    assert book.shape == (fsq.codebook_size, fsq.dim) and book.dtype == torch.float32
    assert torch.equal(fsq.codes_to_indices(book), arange)
    assert torch.equal(fsq.indices_to_codes(fsq.codes_to_indices(book)), book)
    # bf16-rounded codes (1/3 is inexact) still map back to the right index.
    assert torch.equal(fsq.codes_to_indices(book.to(torch.bfloat16)), arange)
    # Dimension 0 is least significant: index 1 moves level_0 by one, the rest stay at level 0.
    assert fsq.levels_from_indices(torch.tensor(1)).tolist() == [1] + [0] * (fsq.dim - 1)


def test_forward_codes_match_indices_and_leading_shape_is_kept():
    fsq = FSQ("64k")
    torch.manual_seed(1)
    z = 2.0 * torch.randn(3, 5, 7, 6)
    codes, indices = fsq(z)
    assert codes.shape == (3, 5, 7, 6) and indices.shape == (3, 5, 7)
    assert torch.equal(fsq.indices_to_codes(indices), codes)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    codes_1, indices_1 = fsq(z[0, 0, 0])
    assert indices_1.shape == () and torch.equal(codes_1, codes[0, 0, 0])
    codes_0, indices_0 = fsq(torch.zeros(0, 6))
    assert codes_0.shape == (0, 6) and indices_0.shape == (0,)


def test_six_level_codes_are_the_asymmetric_grid():
    fsq = FSQ((6,))
    z = torch.linspace(-6, 6, 2001).unsqueeze(-1)
    codes, indices = fsq(z)
    expected = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]) / 3
    assert torch.equal(codes.unique(), expected)
    assert indices.unique().tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(fsq.implicit_codebook()[:, 0], expected)
    assert torch.equal(FSQ((8,)).implicit_codebook()[:, 0], torch.arange(-4, 4) / 4)


# ---------------------------------------------------------------- bf16 and extremes


def test_bf16_extreme_inputs_stay_in_codebook_on_grid():
    fsq = FSQ("16k")
    info = torch.finfo(torch.bfloat16)
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-30, info.tiny, info.smallest_normal, 1e4, -1e4,
                             info.max, info.min, 0.5, -0.5, 2.0, -2.0])
    torch.manual_seed(2)
    z = torch.cat([specials.repeat(5), 3.0 * torch.randn(995)]).reshape(-1, 5).to(torch.bfloat16)
    codes, indices = fsq(z)
    assert codes.dtype == torch.bfloat16 and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < fsq.codebook_size
    # Codes are the bf16 images of the exact grid values of their own index.
    assert torch.equal(codes, fsq.indices_to_codes(indices).to(torch.bfloat16))
    for j, L in enumerate(fsq.levels.tolist()):
        grid = _grid_values(L).to(torch.bfloat16)
        assert torch.isin(codes[:, j], grid).all()
    # Saturating inputs land on the outermost levels.
    _, idx = fsq(torch.full((2, 5), 1e4, dtype=torch.bfloat16) * torch.tensor([[1.0], [-1.0]]).bfloat16())
    assert idx.tolist() == [fsq.codebook_size - 1, 0]


def test_bf16_matches_fp32_on_the_same_values_and_autocast_is_ignored():
    fsq = FSQ("64k")
    torch.manual_seed(3)
    z_bf = (2.0 * torch.randn(256, 6)).to(torch.bfloat16)
    codes_bf, idx_bf = fsq(z_bf)
    codes_32, idx_32 = fsq(z_bf.float())
    assert torch.equal(idx_bf, idx_32)
    assert torch.equal(codes_bf, codes_32.to(torch.bfloat16))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        codes_ac, idx_ac = fsq(z_bf.float())
    assert codes_ac.dtype == torch.float32
    assert torch.equal(codes_ac, codes_32) and torch.equal(idx_ac, idx_32)


# ---------------------------------------------------------------- gradient


@pytest.mark.parametrize("preset", ["16k", "64k"])
def test_straight_through_gradient_is_bound_derivative(preset):
    levels = FSQ_PRESETS[preset]
    fsq = FSQ(levels)
    torch.manual_seed(4)
    z = (1.5 * torch.randn(64, len(levels))).requires_grad_()
    fsq(z)[0].sum().backward()

    half_l, off, shift, half_width = _reference_constants(levels)
    z_ref = z.detach().clone().requires_grad_()
    ((torch.tanh(z_ref + shift) * half_l - off) / half_width).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-6, atol=0)
    # The analytic form: tanh'(z + shift) * half_l / (L // 2).
    analytic = (1 - torch.tanh(z.detach() + shift) ** 2) * half_l / half_width
    torch.testing.assert_close(z.grad, analytic, rtol=1e-5, atol=1e-7)
    assert (z.grad > 0).all()


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_value_error_naming_the_value():
    fsq = FSQ("16k")
    with pytest.raises(ValueError, match=r"got shape \(3, 4\)"):
        fsq(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="got shape"):
        fsq.codes_to_indices(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="min -1 and max 15360"):
        fsq.indices_to_codes(torch.tensor([-1, 0, 15360]))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        fsq.indices_to_codes(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="off the level grid"):
        fsq.codes_to_indices(torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]))  # 1.0 is not on the 6-level grid
    with pytest.raises(ValueError, match="'32k'.*'16k'"):
        FSQ("32k")
    with pytest.raises(ValueError, match="got 1 in"):
        fsq_levels([8, 1])
    with pytest.raises(ValueError, match="got 0.5"):
        FSQ((8, 5), eps=0.5)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        fsq(torch.zeros(2, 5, dtype=torch.int64))


# ---------------------------------------------------------------- proximal bottleneck


def test_linf_limit_projects_onto_hypercube_surface():
    torch.manual_seed(5)
    u = 3.0 * torch.randn(50, 128)
    out = apply_limit(u, "linf")
    assert torch.equal(out.abs().amax(dim=-1), torch.ones(50))
    # A pure rescaling: direction (and the sign pattern) is unchanged.
    torch.testing.assert_close(out * u.abs().amax(dim=-1, keepdim=True), u)
    out_bf = apply_limit(u.to(torch.bfloat16), "linf")
    assert out_bf.dtype == torch.bfloat16
    assert torch.equal(out_bf.abs().amax(dim=-1).float(), torch.ones(50))
    assert torch.equal(apply_limit(torch.zeros(2, 4), "linf"), torch.zeros(2, 4))  # eps guards 0/0


def test_other_limits():
    torch.manual_seed(6)
    u = 3.0 * torch.randn(50, 32)
    torch.testing.assert_close(torch.linalg.vector_norm(apply_limit(u, "l2"), dim=-1), torch.ones(50))
    assert torch.equal(apply_limit(u, "tanh"), torch.tanh(u))
    assert apply_limit(u, "none") is u
    with pytest.raises(ValueError, match="'linfinity'"):
        apply_limit(u, "linfinity")
