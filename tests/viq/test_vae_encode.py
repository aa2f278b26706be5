"""The encoder half of the Qwen-Image VAE (viq.vae), the latent reconstruction target of the tokenizer stages,
on a tiny random configuration: it equals diffusers' own ``encode(...).latent_dist.mean``."""

from __future__ import annotations

import sys

import pytest
import torch

from viq.vae import (
    encode_latents,
    load_qwen_image_vae_encoder,
    load_vae_halves,
    vae_available,
)

TINY = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [False, True, True]}
needs_diffusers = pytest.mark.skipif(not vae_available(), reason='diffusers is optional: pip install "viq[reference]"')


@pytest.fixture(scope="module")
def full():
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(**TINY).eval()
    for p in vae.parameters():  # random init leaves zero biases and unit norms: make every tensor count
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return vae


@needs_diffusers
def test_encoded_latents_equal_diffusers_posterior_mean(full, tmp_path):
    full.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    encoder, decoder = load_vae_halves(tmp_path / "vae")
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in encoder.state_dict())
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in decoder.state_dict())
    assert not any(p.requires_grad for p in encoder.parameters())
    g = torch.Generator().manual_seed(0)
    for h, w in [(32, 48), (64, 32)]:
        image = torch.rand(3, h, w, generator=g) * 2 - 1
        ours = encode_latents(encoder, image)
        with torch.no_grad():
            theirs = full.encode(image[None, :, None]).latent_dist.mean[0, :, 0]
        assert ours.shape == (16, h // 8, w // 8)
        assert ours.abs().mean() > 1e-3  # a real signal, not zeros on both sides
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="not loaded: this copy only encodes"):
        encoder.decode(torch.zeros(1, 16, 1, 2, 2))


@needs_diffusers
def test_strict_encoder_loading_and_bad_input(full, tmp_path):
    state = full.state_dict()
    missing = {k: v for k, v in state.items() if k != "quant_conv.bias"}
    with pytest.raises(ValueError, match=r"Qwen-Image VAE encoder: missing \['f: quant_conv\.bias'\]"):
        load_qwen_image_vae_encoder(missing, TINY, what="f: ")
    encoder_only = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
    encoder = load_qwen_image_vae_encoder(encoder_only, TINY)
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_latents(encoder, torch.zeros(3, 20, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_vae_halves(tmp_path / "empty")


def test_without_diffusers_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails, as when not installed
    assert not vae_available()
    with pytest.raises(ValueError, match=r'encoder needs diffusers.*pip install "viq\[reference\]"'):
        load_vae_halves(tmp_path)
