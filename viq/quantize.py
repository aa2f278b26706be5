"""Finite scalar quantization (FSQ) and the L-inf proximal bottleneck of stage 2-1.

Shape legend (suffixes on tensor names):
    N   any leading shape (packed tokens, or batch x sequence); FSQ accepts it whole
    D   model width at the bottleneck's input and output
    B   bottleneck width of the proximal (stage 2-1) limit
    d   FSQ dimensions, one per entry of `levels`
    K   codebook size, prod(levels)

FSQ math follows the ViQ reference (reference doc, section 2.5). Per dimension with L levels:
    half_l = (L - 1)(1 + eps) / 2,  off = 0.5 if L is even else 0,  shift = atanh(off / half_l)
    bounded = tanh(z + shift) * half_l - off
    rounded = round(bounded)          (straight-through gradient)
    level   = rounded + L // 2        (integer in [0, L - 1])
    code    = rounded / (L // 2)      (in [-1, 1]; asymmetric for even L, e.g. L=6 -> -1 .. 2/3)
    index   = sum_j level_j * basis_j,  basis = cumprod([1, L_0, L_1, ...])  (dimension 0 least significant)

Bound, round and index run in an fp32 island (input up-cast, autocast off) because bf16 cannot hold
the bounded values precisely enough to round them to the right level. The index comes from the
integer levels, never from the float codes, so it is exact in every input dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

FSQ_PRESETS: dict[str, tuple[int, ...]] = {
    "2k": (8, 8, 4, 3, 3),
    "4k": (8, 8, 4, 4, 4),
    "8k": (8, 8, 8, 4, 4),
    "16k": (8, 8, 8, 6, 5),
    "64k": (8, 8, 8, 5, 5, 5),
}

LIMITS = ("linf", "l2", "tanh", "none")


@contextmanager
def _fp32_island():
    """Disable autocast for both device types, so ops on up-cast fp32 tensors stay fp32."""
    with ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
        stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
        yield


def fsq_levels(preset_or_levels: str | Sequence[int]) -> tuple[int, ...]:
    """Resolve a preset name ("16k", ...) or an explicit sequence of levels to a tuple of ints."""
    if isinstance(preset_or_levels, str):
        if preset_or_levels not in FSQ_PRESETS:
            raise ValueError(
                f"unknown FSQ preset {preset_or_levels!r}; valid presets: {sorted(FSQ_PRESETS)}"
            )
        return FSQ_PRESETS[preset_or_levels]
    levels = tuple(preset_or_levels)
    if not levels:
        raise ValueError("FSQ levels must not be empty")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or level < 2:
            raise ValueError(f"every FSQ level must be an integer >= 2, got {level!r} in {levels}")
    return tuple(int(level) for level in levels)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # Forward value is exactly round(x) (the fp32 difference is exact for |x| < 2**23); the gradient
    # is the identity, which is what lets the encoder learn through the quantizer.
    return x + (torch.round(x) - x).detach()


class FSQ(nn.Module):
    """Finite scalar quantizer without projections: z [N, d] -> (codes [N, d], indices [N]).

    It has no parameters; `levels` and `basis` are non-persistent int64 buffers, so checkpoints do not
    carry them and casting the module to bf16 leaves them integer.
    """

    def __init__(self, levels: str | Sequence[int], eps: float = 1e-3):
        super().__init__()
        levels_t = fsq_levels(levels)
        # The bounded value reaches (L - 1) * eps / 2 past the outermost level centre; at 0.5 or more
        # it would round to a level outside [0, L - 1] and the index would leave the codebook.
        if not eps > 0 or (max(levels_t) - 1) * eps >= 1:
            raise ValueError(f"FSQ eps must be in (0, 1/(max(levels)-1)) for levels {levels_t}, got {eps}")
        self.eps = float(eps)
        self.register_buffer("levels", torch.tensor(levels_t, dtype=torch.int64), persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + levels_t[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("basis", basis, persistent=False)
        self._levels_tuple = levels_t

    @property
    def dim(self) -> int:
        return len(self._levels_tuple)

    @property
    def codebook_size(self) -> int:
        return math.prod(self._levels_tuple)

    def extra_repr(self) -> str:
        return f"levels={self._levels_tuple}, eps={self.eps}"

    def _half_width_d(self) -> torch.Tensor:
        return torch.div(self.levels, 2, rounding_mode="floor")

    def _check_last_dim(self, x: torch.Tensor, name: str) -> None:
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have last axis of size {self.dim} (levels {self._levels_tuple}), "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, z_Nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize; codes come back in z's dtype, indices as int64 with z's leading shape.

        The cast back to z's dtype happens after rounding, so bf16 codes of a 6-level dimension hold
        bf16(1/3) = 0.333984375, not fp32(1/3); the indices are unaffected.
        """
        self._check_last_dim(z_Nd, "z")
        if not z_Nd.is_floating_point():
            raise ValueError(f"z must be a floating-point tensor, got dtype {z_Nd.dtype}")
        with _fp32_island():
            z32_Nd = z_Nd.float()
            # Constants are built in fp32 exactly as the reference does, so the results are bit-equal.
            half_l_d = (self.levels - 1) * (1 + self.eps) / 2
            off_d = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(half_l_d)
            shift_d = torch.atanh(off_d / half_l_d)
            bounded_Nd = torch.tanh(z32_Nd + shift_d) * half_l_d - off_d
            rounded_Nd = _round_ste(bounded_Nd)
            half_width_d = self._half_width_d()
            codes_Nd = rounded_Nd / half_width_d
            level_Nd = rounded_Nd.detach().to(torch.int64) + half_width_d
            indices_N = (level_Nd * self.basis).sum(dim=-1)
        return codes_Nd.to(z_Nd.dtype), indices_N

    def levels_from_indices(self, indices_N: torch.Tensor) -> torch.Tensor:
        """Flat indices [N] -> integer levels [N, d], each in [0, L_j - 1]."""
        if indices_N.is_floating_point() or indices_N.is_complex() or indices_N.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices_N.dtype}")
        if indices_N.numel() > 0 and not indices_N.is_meta:  # meta tensors (shape-only builds) hold no values
            lo, hi = int(indices_N.min()), int(indices_N.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}) for levels {self._levels_tuple}, "
                    f"found min {lo} and max {hi}"
                )
        indices_N1 = indices_N.to(device=self.levels.device, dtype=torch.int64).unsqueeze(-1)
        return torch.div(indices_N1, self.basis, rounding_mode="floor") % self.levels

    def indices_to_codes(self, indices_N: torch.Tensor) -> torch.Tensor:
        """Flat indices [N] -> fp32 codes [N, d] on the level grid."""
        half_width_d = self._half_width_d()
        return (self.levels_from_indices(indices_N) - half_width_d).float() / half_width_d

    def codes_to_indices(self, codes_Nd: torch.Tensor) -> torch.Tensor:
        """Codes [N, d] (any float dtype, e.g. bf16-rounded) -> flat int64 indices [N]."""
        self._check_last_dim(codes_Nd, "codes")
        half_width_d = self._half_width_d()
        with _fp32_island():
            level_Nd = torch.round(codes_Nd.float() * half_width_d + half_width_d)
        # Written as a negated in-range test so that NaN codes are rejected too.
        bad_Nd = ~((level_Nd >= 0) & (level_Nd <= self.levels - 1))
        if bool(bad_Nd.any()):
            raise ValueError(
                f"codes are off the level grid of levels {self._levels_tuple}: "
                f"first offending code {codes_Nd[bad_Nd][0].item()!r}"
            )
        return (level_Nd.to(torch.int64) * self.basis).sum(dim=-1)

    def implicit_codebook(self) -> torch.Tensor:
        """All codes [K, d] in fp32; row k holds the codes of index k."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self.levels.device))


def apply_limit(u_NB: torch.Tensor, limit: str, eps: float = 1e-6) -> torch.Tensor:
    """Apply a bottleneck limit along the last axis, computed in fp32 and cast back to u's dtype.

    "linf" projects onto the surface of the unit hypercube (one coordinate is exactly +-1); it is
    differentiable, so no straight-through estimator is needed. "l2" projects onto the unit sphere.
    """
    if limit not in LIMITS:
        raise ValueError(f"unknown limit {limit!r}; valid limits: {list(LIMITS)}")
    if limit == "none":
        return u_NB
    with _fp32_island():
        u32_NB = u_NB.float()
        if limit == "linf":
            out_NB = u32_NB / u32_NB.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
        elif limit == "l2":
            out_NB = u32_NB / torch.linalg.vector_norm(u32_NB, dim=-1, keepdim=True).clamp_min(eps)
        else:
            out_NB = torch.tanh(u32_NB)
    return out_NB.to(u_NB.dtype)
