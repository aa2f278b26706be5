"""Our encoder loaded from a SigLIP2 checkpoint equals transformers' Siglip2VisionModel (fp32, CPU)."""

import pytest
import torch
from random_weights import randomise
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel

from viq.convert import load_siglip2
from viq.encoder import cu_from_grids, patchify

PATCH = 16


def _tiny_vision_config(**kw):
    base = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_patches=16, patch_size=PATCH)
    base.update(kw)
    return Siglip2VisionConfig(**base)


def _hf_inputs(images):
    """NaFlex inputs: patches flattened as (p, p, C), padded to the longest image, with a mask."""
    seqs, shapes = [], []
    for x in images:
        c, hgt, wid = x.shape
        h, w = hgt // PATCH, wid // PATCH
        seqs.append(x.reshape(c, h, PATCH, w, PATCH).permute(1, 3, 2, 4, 0).reshape(h * w, -1))
        shapes.append((h, w))
    n = max(len(s) for s in seqs)
    pixel_values = torch.zeros(len(seqs), n, 3 * PATCH * PATCH)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        pixel_values[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return pixel_values, mask, torch.tensor(shapes)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    # a wide 2x4 grid (upsampled from the 4x4 table) and a tall 6x3 grid (mixed up/down sampling)
    return [torch.rand(3, 32, 64, generator=g) * 2 - 1, torch.rand(3, 96, 48, generator=g) * 2 - 1]


def _compare(hf_model, ours, images):
    pixel_values, mask, shapes = _hf_inputs(images)
    with torch.no_grad():
        ref = hf_model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        feats = ours.forward_images(images)
        patches, grids = patchify(images, PATCH)
        cu, max_len = cu_from_grids(grids, "cpu")
        pooled = ours.pool(ours.forward_packed(patches, grids, cu, max_len), cu)
    for i, f in enumerate(feats):
        n = int(mask[i].sum())
        assert f.shape == (n, ours.cfg.width)
        assert (f - ref.last_hidden_state[i, :n]).abs().max() <= 1e-4
    assert (pooled - ref.pooler_output).abs().max() <= 1e-4


def test_vision_model_parity(tmp_path, images):
    hf = randomise(Siglip2VisionModel(_tiny_vision_config())).eval()
    hf.save_pretrained(tmp_path)
    ours = load_siglip2(tmp_path).eval()
    assert ours.cfg.gelu == "tanh" and ours.cfg.pos_antialias and ours.cfg.pos_grid == 4
    _compare(hf, ours, images)


def test_full_siglip2_model_loads_vision_tower(tmp_path, images):
    cfg = Siglip2Config(vision_config=_tiny_vision_config().to_dict(),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=100))
    full = randomise(Siglip2Model(cfg)).eval()
    full.save_pretrained(tmp_path)
    _compare(full.vision_model, load_siglip2(tmp_path).eval(), images)


def test_parity_fails_when_a_tensor_is_wrong(tmp_path, images):
    """The comparison is sensitive: a transposed position table (h and w swapped) breaks it."""
    hf = randomise(Siglip2VisionModel(_tiny_vision_config())).eval()
    hf.save_pretrained(tmp_path)
    ours = load_siglip2(tmp_path).eval()
    with torch.no_grad():
        g = ours.cfg.pos_grid
        ours.pos_embed.copy_(ours.pos_embed.reshape(g, g, -1).transpose(0, 1).reshape(1, g * g, -1))
    with pytest.raises(AssertionError):
        _compare(hf, ours, images)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_siglip2(tmp_path)
