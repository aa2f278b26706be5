"""viq.vae on a tiny random Qwen-Image VAE (diffusers' AutoencoderKLQwenImage), and the latent path
of ViQTokenizer.decode. The parity against the authors' pictures lives in test_reference_parity.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from viq import Codes, ViQTokenizer
from viq.config import DecoderConfig, preset
from viq.vae import decode_latents, load_qwen_image_vae_decoder, load_vae, save_vae, vae_available

TINY = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [False, True, True]}


def _latent_tokenizer() -> ViQTokenizer:
    """The debug preset with the released drawer's output: 16 latent channels, 2x2 per patch."""
    cfg = preset("debug")
    dec = dataclasses.replace(cfg.decoder, out_channels=16, upscale=2)
    assert isinstance(dec, DecoderConfig)
    return ViQTokenizer.from_preset("debug", seed=0, decoder=dec).eval()


def _codes(tok: ViQTokenizer, grid=(2, 3), seed=0) -> Codes:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * tok.codes_per_patch
    return Codes(torch.randint(0, tok.codebook_size, (n,), generator=g), grid)


def test_decode_without_vae_explains_what_to_install():
    tok = _latent_tokenizer()
    assert tok.vae is None
    with pytest.raises(ValueError, match=r'pip install "viq\[reference\]"'):
        tok.decode(_codes(tok))


needs_diffusers = pytest.mark.skipif(not vae_available(), reason='diffusers is optional: pip install "viq[reference]"')


def test_loading_without_diffusers_explains(monkeypatch):
    monkeypatch.setattr("viq.vae.vae_available", lambda: False)
    with pytest.raises(ValueError, match=r'pip install "viq\[reference\]"'):
        load_qwen_image_vae_decoder({}, TINY)


@pytest.fixture(scope="module")
def full():
    """A complete random VAE (encoder too), as the released files carry one."""
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(**TINY).eval()
    for p in vae.parameters():  # random init leaves zero biases and unit norms: make every tensor count
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return vae


@pytest.fixture(scope="module")
def vae(full):
    return load_qwen_image_vae_decoder(full.state_dict(), TINY, what="tiny: ")


def _latent(h=4, w=6, seed=1):
    return torch.randn(16, h, w, generator=torch.Generator().manual_seed(seed))


@needs_diffusers
def test_decoder_half_decodes_like_the_full_vae(full, vae):
    z = _latent()
    ours = decode_latents(vae, z)
    with torch.no_grad():
        x = full.decode(z.to(torch.bfloat16).float()[None, :, None], return_dict=False)[0][0, :, 0]
    expected = ((x.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1).numpy() * 255).astype(np.uint8)  # truncation
    assert ours.dtype == np.uint8 and ours.shape == (32, 48, 3)
    assert np.array_equal(ours, expected)
    batch = decode_latents(vae, torch.stack([z, _latent(seed=2)]))
    assert batch.shape == (2, 32, 48, 3)  # batched convolutions differ by float noise, then truncation
    assert np.abs(batch[0].astype(int) - ours).max() <= 1


@needs_diffusers
def test_encoder_half_is_not_kept(vae):
    names = list(vae.state_dict())
    assert names and all(k.startswith(("decoder.", "post_quant_conv.")) for k in names)
    with pytest.raises(RuntimeError, match="not loaded"):
        vae.encode(torch.zeros(1, 3, 1, 16, 16))


@needs_diffusers
def test_strict_loading_names_the_tensor(full):
    state = full.state_dict()
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match=r"missing \['f.pth: vae\.decoder\.conv_out\.bias'\]"):
        load_qwen_image_vae_decoder(missing, TINY, what="f.pth: vae.")
    with pytest.raises(ValueError, match=r"unexpected \['f.pth: vae\.decoder\.extra'\]"):
        load_qwen_image_vae_decoder({**state, "decoder.extra": torch.zeros(1)}, TINY, what="f.pth: vae.")
    bad = {**state, "post_quant_conv.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"shape mismatches \['f.pth: vae\.post_quant_conv\.bias \(3,\)"):
        load_qwen_image_vae_decoder(bad, TINY, what="f.pth: vae.")
    decoder_only = {k: v for k, v in state.items() if not k.startswith(("encoder.", "quant_conv."))}
    assert load_qwen_image_vae_decoder(decoder_only, TINY) is not None


@needs_diffusers
def test_dtype_and_wrong_latents(full):
    vae16 = load_qwen_image_vae_decoder(full.state_dict(), TINY, dtype=torch.bfloat16)
    assert {p.dtype for p in vae16.parameters()} == {torch.bfloat16}
    assert decode_latents(vae16, _latent()).shape == (32, 48, 3)
    with pytest.raises(ValueError, match=r"\[16, h, w\]"):
        decode_latents(vae16, torch.zeros(4, 4, 6))


@needs_diffusers
def test_save_and_load(vae, tmp_path):
    save_vae(vae, tmp_path / "vae")
    again = load_vae(tmp_path / "vae")
    assert again.config.base_dim == TINY["base_dim"]
    for (k, a), (k2, b) in zip(vae.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is missing"):
        load_vae(tmp_path / "vae")


@needs_diffusers
def test_tokenizer_decodes_latents_and_keeps_its_vae(vae, tmp_path):
    tok = _latent_tokenizer()
    tok.vae = vae
    assert not any(k.startswith("vae") for k in tok.state_dict())  # saved apart, never trained
    codes = [_codes(tok, (2, 3)), _codes(tok, (1, 2), seed=1)]
    images = tok.decode(codes)
    assert [im.size for im in images] == [(48, 32), (32, 16)] and images[0].mode == "RGB"
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "vae" / "config.json").is_file()
    again = ViQTokenizer.from_pretrained(tmp_path / "tok")
    assert again.vae is not None
    assert [np.asarray(im).tolist() for im in again.decode(codes)] == [np.asarray(im).tolist() for im in images]
