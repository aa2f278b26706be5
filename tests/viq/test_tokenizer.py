"""ViQTokenizer contracts on the debug preset: packing, determinism, embed == head, save/load, STE."""

import numpy as np
import pytest
import torch
from PIL import Image

from viq import Codes, ViQTokenizer
from viq.encoder import cu_from_grids, patchify


@pytest.fixture(scope="module")
def tok():
    return ViQTokenizer.from_preset("debug", seed=0).eval()


def _img(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def images():
    # square, wide, tall, a 1x8 patch grid and a 1:4 image
    return [_img(64, 64, 0), _img(32, 96, 1), _img(96, 48, 2), _img(16, 128, 3), _img(32, 128, 4)]


def test_packed_batch_equals_each_image_alone(tok, images):
    batch = tok.encode(images)
    for img, codes in zip(images, batch, strict=True):
        alone = tok.encode([img])[0]
        assert codes.grid == alone.grid
        assert torch.equal(codes.indices, alone.indices)


def test_codes_layout_and_range(tok, images):
    for img, codes in zip(images, tok.encode(images), strict=True):
        h, w = img.shape[1] // 16, img.shape[2] // 16
        assert codes.grid == (h, w)
        assert codes.indices.shape == (h * w * tok.codes_per_patch,)
        assert codes.indices.dtype == torch.int64
        assert 0 <= int(codes.indices.min()) and int(codes.indices.max()) < tok.codebook_size


def test_codes_depend_on_the_image(tok, images):
    a, b = tok.encode([images[0], images[0].flip(-1)])
    assert not torch.equal(a.indices, b.indices)


def test_encode_is_deterministic(tok, images):
    first = tok.encode(images)
    second = tok.encode(images)
    assert all(torch.equal(x.indices, y.indices) for x, y in zip(first, second, strict=True))


def test_embed_of_codes_equals_head_output(tok, images):
    with torch.no_grad():
        out = tok(images)
    codes = tok.encode(images)
    feats = tok.embed(codes)
    sizes = [h * w for h, w in out.grids]
    for f, ref in zip(feats, out.head.features.split(sizes), strict=True):
        assert torch.allclose(f, ref, atol=1e-6, rtol=0)


def test_embed_is_token_local(tok, images):
    """A patch's feature depends on its own codes only, so any batching gives the same features."""
    codes = tok.encode(images)
    together = torch.cat(tok.embed(codes))
    alone = torch.cat([tok.embed(c)[0] for c in codes])
    assert torch.equal(together, alone)


def test_save_and_load_give_identical_codes(tok, images, tmp_path):
    tok.save_pretrained(tmp_path)
    again = ViQTokenizer.from_pretrained(tmp_path)
    assert again.cfg == tok.cfg
    for x, y in zip(tok.encode(images), again.encode(images), strict=True):
        assert torch.equal(x.indices, y.indices)


def test_pil_and_array_inputs_follow_the_preprocess_config(tok):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(90, 200, 3), dtype=np.uint8)
    from_pil, from_arr = tok.encode([Image.fromarray(arr), arr])
    assert torch.equal(from_pil.indices, from_arr.indices)
    h, w = from_pil.grid
    assert h % 2 == 0 and w % 2 == 0  # area-preserving resize to multiples of 32


def test_gradients_flow_through_straight_through_estimator(images):
    tok = ViQTokenizer.from_preset("debug", seed=1).train()
    out = tok(images[:2])
    loss = out.head.features.pow(2).mean()
    loss.backward()
    for name in ("encoder.blocks.0.attn.qkv.weight", "head.project_in.weight", "head.rope_blocks.0.attn.qkv.weight"):
        grad = dict(tok.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_decode_returns_images_of_the_grid_size(tok, images):
    codes = tok.encode(images[:2])
    pics = tok.decode(codes)
    assert [p.size for p in pics] == [(c.grid[1] * 16, c.grid[0] * 16) for c in codes]


def test_bad_codes_are_rejected(tok, images):
    codes = tok.encode(images[:1])[0]
    with pytest.raises(ValueError, match="do not match grid"):
        tok.embed(Codes(codes.indices[:-1], codes.grid))
    bad = codes.indices.clone()
    bad[0] = tok.codebook_size
    with pytest.raises(ValueError, match="outside"):
        tok.embed(Codes(bad, codes.grid))


def test_bad_images_are_rejected(tok, tmp_path):
    with pytest.raises(ValueError, match="zero area"):
        tok.encode([torch.zeros(3, 0, 32)])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        tok.encode([junk])


def test_unknown_preset():
    with pytest.raises(ValueError, match="nonexistent"):
        ViQTokenizer.from_preset("nonexistent")


def test_packing_matches_per_image_trunk(tok, images):
    """The encoder trunk on a packed batch equals the trunk on each image alone (block-diagonal)."""
    patches, grids = patchify(images, 16)
    cu, max_len = cu_from_grids(grids, "cpu")
    with torch.no_grad():
        packed = tok.encoder.forward_packed(patches, grids, cu, max_len)
        for part, img in zip(packed.split([h * w for h, w in grids]), images, strict=True):
            p, g = patchify([img], 16)
            c, m = cu_from_grids(g, "cpu")
            assert torch.allclose(part, tok.encoder.forward_packed(p, g, c, m), atol=1e-5)


def test_skip_weight_init_is_scoped():
    # a torch function mode, not a patch of torch.nn.init: the module's functions stay the same objects,
    # another thread initialises normally meanwhile, and nothing is skipped after the block
    import threading

    from viq.tokenizer import skip_weight_init

    before = torch.nn.init.uniform_
    other: list[torch.Tensor] = []
    with skip_weight_init():
        assert torch.nn.init.uniform_ is before
        skipped = torch.nn.init.uniform_(torch.zeros(64))
        thread = threading.Thread(target=lambda: other.append(torch.nn.init.uniform_(torch.zeros(64))))
        thread.start()
        thread.join()
    assert torch.count_nonzero(skipped) == 0
    assert torch.count_nonzero(other[0]) > 0
    assert torch.count_nonzero(torch.nn.init.uniform_(torch.zeros(64))) > 0
