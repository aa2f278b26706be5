"""Our encoder loaded from a fixed-resolution SigLIP checkpoint (model_type siglip: the format SigLIP2-g and
the fixed-resolution so400m/base SigLIP2 towers are published in) equals transformers' SiglipVisionModel at
the checkpoint's native resolution (fp32, CPU), for patch 14 and 16; the table is resized as ViQ does
elsewhere; unsupported checkpoints are named with the file and the field."""

import json

import pytest
import torch
from random_weights import randomise
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import (
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from viq.convert import load_siglip2


def tiny_vision_config(patch: int, **kw) -> SiglipVisionConfig:
    base = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                image_size=4 * patch, patch_size=patch)
    base.update(kw)
    return SiglipVisionConfig(**base)


def compare(hf_model, ours, size: int) -> float:
    """Largest difference of the patch features and the MAP output on two native-size images."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = hf_model(pixel_values=x)
        feats = ours.forward_images(list(x))
        out = ours.forward_pixels(list(x))
        pooled = ours.pool(out.trunk_ND, out.cu)
    diff = max((f - r).abs().max().item() for f, r in zip(feats, ref.last_hidden_state, strict=True))
    return max(diff, (pooled - ref.pooler_output).abs().max().item())


@pytest.mark.parametrize("patch", [14, 16])
def test_vision_model_parity_at_native_resolution(tmp_path, patch):
    hf = randomise(SiglipVisionModel(tiny_vision_config(patch))).eval()
    hf.save_pretrained(tmp_path)
    ours = load_siglip2(tmp_path).eval()
    cfg = ours.cfg
    assert (cfg.patch_size, cfg.pos_grid, cfg.gelu, cfg.pos_antialias) == (patch, 4, "tanh", False)
    assert compare(hf, ours, 4 * patch) <= 1e-4


def test_full_siglip_model_loads_vision_tower(tmp_path):
    cfg = SiglipConfig(vision_config=tiny_vision_config(14).to_dict(),
                       text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=100))
    full = randomise(SiglipModel(cfg)).eval()
    full.save_pretrained(tmp_path)
    assert compare(full.vision_model, load_siglip2(tmp_path).eval(), 56) <= 1e-4


def test_parity_fails_when_the_patch_kernel_is_transposed(tmp_path):
    """The comparison is sensitive: the conv kernel with its two spatial axes swapped breaks it."""
    hf = randomise(SiglipVisionModel(tiny_vision_config(14))).eval()
    hf.save_pretrained(tmp_path)
    ours = load_siglip2(tmp_path).eval()
    with torch.no_grad():
        ours.patch_embed.proj.weight.copy_(ours.patch_embed.proj.weight.transpose(2, 3).clone())
    assert compare(hf, ours, 56) > 1e-3


def test_other_grids_resize_the_table_bilinearly(tmp_path):
    """Away from the native grid the table is resized as ViQ does: bilinear, align_corners=False, no antialias."""
    SiglipVisionModel(tiny_vision_config(16)).save_pretrained(tmp_path)
    ours = load_siglip2(tmp_path)
    table = ours.pos_embed.detach().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    for grid in [(2, 3), (7, 5)]:
        want = F.interpolate(table, size=grid, mode="bilinear", align_corners=False, antialias=False)
        torch.testing.assert_close(ours.position_embedding(grid), want[0].flatten(1).t())


def test_pos_grid_resamples_the_table_once_bicubically(tmp_path):
    """The reference's start of SigLIP2-g: the native table resampled once (bicubic) to the any-res grid."""
    SiglipVisionModel(tiny_vision_config(16)).save_pretrained(tmp_path)
    native = load_siglip2(tmp_path)
    resized = load_siglip2(tmp_path, pos_grid=8)
    assert (resized.cfg.pos_grid, resized.cfg.pos_antialias) == (8, False)
    table = native.pos_embed.detach().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False)[0].flatten(1).t()
    torch.testing.assert_close(resized.position_embedding((8, 8)), want)
    other = {k: v for k, v in resized.state_dict().items() if k != "pos_embed"}
    assert all(torch.equal(v, native.state_dict()[k]) for k, v in other.items())


def test_text_only_checkpoint_is_named(tmp_path):
    SiglipTextModel(SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: model_type 'siglip_text_model' is a text-only"):
        load_siglip2(tmp_path)


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'clip_vision_model' is not a SigLIP"):
        load_siglip2(tmp_path)


def test_non_square_table_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2_vision_model", "num_patches": 12}))
    with pytest.raises(ValueError, match=r"config\.json: num_patches 12 is not a square position table"):
        load_siglip2(tmp_path)
    # a fixed-resolution checkpoint whose stored table does not fit its config: the safetensors file is named
    fixed = tmp_path / "fixed"
    SiglipVisionModel(tiny_vision_config(16)).save_pretrained(fixed)
    weights = fixed / "model.safetensors"
    state = load_file(str(weights))
    # published checkpoints prefix the tower's keys with vision_model., transformers 5 saves them without
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    state[key] = state[key][:15]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors: embeddings\.position_embedding\.weight has 15 rows "
                                         r"\(not a square table\)"):
        load_siglip2(fixed)
