"""Projector contracts: token count and layout, 2x2 pooling, batched == per image, text-only batches."""

import pytest
import torch

from mllm.data.layout import num_image_tokens
from mllm.model.projector import Projector, split_images


def _naive(proj: Projector, x_NC, grid):
    """Per-image reference: pool each 2x2 window of the projected grid, one row at a time."""
    h, w = grid
    y = proj.proj1(x_NC).reshape(h, w, -1)
    rows = []
    for r in range(0, h, 2):
        row = []
        for c in range(0, w, 2):
            win = torch.stack([y[r, c], y[r, c + 1], y[r + 1, c], y[r + 1, c + 1]])
            row.append(proj.proj2(torch.nn.functional.gelu(proj.pool(win[None])[0])))
        rows.append(torch.stack(row + [proj.image_newline]))
    return torch.cat([proj.image_begin[None], torch.cat(rows), proj.image_end[None]])


def test_token_count_formula():
    assert num_image_tokens(24, 24) == 12 * 13 + 2 == 158
    assert num_image_tokens(2, 8) == 1 * 5 + 2
    for bad in [(3, 4), (0, 2), (2, -2)]:
        with pytest.raises(ValueError, match="even"):
            num_image_tokens(*bad)


def test_batched_projector_equals_naive_per_image():
    torch.manual_seed(0)
    proj = Projector(16, 24)
    grids = [(2, 2), (4, 6), (2, 8)]
    feats = [torch.randn(h * w, 16) for h, w in grids]
    out = proj(torch.cat(feats), grids)
    assert out.ndim == 2  # one packed tensor whatever the image count (ZeRO-3 traces one output per module)
    for o, f, g in zip(split_images(out, grids), feats, grids, strict=True):
        assert o.shape == (num_image_tokens(*g), 24)
        assert torch.allclose(o, _naive(proj, f, g), atol=1e-6)
        assert torch.equal(o[0], proj.image_begin) and torch.equal(o[-1], proj.image_end)


def test_pooling_of_a_constant_window_is_that_vector():
    torch.manual_seed(1)
    proj = Projector(8, 8)
    v = torch.randn(1, 1, 8).expand(3, 4, 8)
    assert torch.allclose(proj.pool(v), v[:, 0], atol=1e-6)


def test_grid_mismatch_is_rejected():
    proj = Projector(8, 8)
    with pytest.raises(ValueError, match="do not match"):
        proj(torch.randn(5, 8), [(2, 2)])


def test_calibration_standardises_proj1_on_the_features():
    torch.manual_seed(0)
    proj = Projector(16, 32)
    # features with a large shared component, as mostly-background images give
    shared = torch.randn(1, 16) * 3
    feats = [shared + 0.1 * torch.randn(n, 16) for n in (12, 20)]
    y0 = proj.proj1(torch.cat(feats))
    assert (y0.std(0) < 0.5).all()  # what calibration mends: tokens differ by a sliver of their norm
    std = proj.calibrate(feats)
    torch.testing.assert_close(std, y0.std(0).detach())
    y = proj.proj1(torch.cat(feats))
    torch.testing.assert_close(y.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(32), atol=1e-4, rtol=0)
    # an affine map of proj1's old output: the same function up to per-channel scale and shift
    torch.testing.assert_close(y, (y0 - y0.mean(0)) / y0.std(0), atol=1e-4, rtol=0)


def test_concat_pool_keeps_where_each_patch_was():
    torch.manual_seed(0)
    soft, concat = Projector(8, 16), Projector(8, 16, pool="concat")
    grid = (2, 2)
    x = torch.randn(4, 8)
    swapped = x[[1, 0, 3, 2]]  # the same window, left and right columns exchanged
    torch.testing.assert_close(soft(x, [grid]), soft(swapped, [grid]))  # symmetric in the 4 places
    assert not torch.allclose(concat(x, [grid])[1], concat(swapped, [grid])[1])
    feats = [torch.randn(h * w, 8) for h, w in [(2, 4), (4, 2)]]
    grids = [(2, 4), (4, 2)]
    for o, f, g in zip(split_images(concat(torch.cat(feats), grids), grids), feats, grids, strict=True):
        torch.testing.assert_close(o, _naive(concat, f, g), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="'max'"):
        Projector(8, 16, pool="max")

