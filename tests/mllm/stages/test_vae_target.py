"""The VAE-latent reconstruction target of the tokenizer stages (stage.recon_target=vae_latent): the head's
reconstruction branch predicts the posterior mean of a frozen Qwen-Image VAE encoder (a tiny random one here),
the stage's tokenizer keeps the VAE's decoder half to show its reconstructions, and the decoder stage starts an
RGB pixel decoder from the latent drawer."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides, read_log

from mllm.cli import main
from mllm.config import load_recipe
from mllm.data.packing import collate_packed
from mllm.model.layout import VIQ_DIR
from mllm.stages.llm_stage import build_stage_model
from mllm.stages.report import REPORT_FILE
from mllm.train.data_setup import build_datasets
from viq.configio import ConfigError
from viq.decoder import reconstruction_loss
from viq.image import pad_to_multiple
from viq.tokenizer import ViQTokenizer
from viq.vae import encode_latents, vae_available

TOK = RECIPES / "tokenizer" / "debug"
TINY = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [False, True, True]}
pytestmark = pytest.mark.skipif(not vae_available(), reason='diffusers is optional: pip install "viq[reference]"')


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(**TINY)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


def latent_cfg(demo, out, vae_dir, name="stage2_1_proximal", *extra):
    return load_recipe(TOK / f"{name}.yaml", debug_overrides(
        demo, out, "stage.recon_target=vae_latent", f"stage.vae={vae_dir}", *extra))


def test_recon_term_regresses_the_vae_posterior_mean(demo_data, tmp_path, vae_dir):
    cfg = latent_cfg(demo_data, tmp_path, vae_dir, "stage2_1_proximal", "stage.init=debug")
    built = build_stage_model(cfg, cuda=False)
    model = built.model
    dec = model.tokenizer.cfg.decoder
    assert (dec.out_channels, dec.upscale) == (16, 2)  # 2x2 latent pixels of 16 channels per 16-px patch
    assert model.tokenizer.vae is not None and model.vae_encoder is not None
    assert not any(k.startswith("vae") for k in model.state_dict())  # never trained, never checkpointed
    train_ds, _, _ = build_datasets(cfg, built.tokenizer, model.visual.patch_size)
    batch = collate_packed([train_ds[0]])
    out = model(**batch)
    trace = model.visual.trace
    assert trace is None  # dropped by the forward; recompute the expected term from the same weights
    with torch.no_grad():
        model.visual(pixel_values=batch["pixel_values"])
        trace, model.visual.trace = model.visual.trace, None
        preds = model.decoder(trace.head.features, trace.grids, trace.cu, trace.max_len)
        targets = [encode_latents(model.vae_encoder, pad_to_multiple(x, 16)) for x in batch["pixel_values"]]
    assert [p.shape for p in preds] == [t.shape for t in targets]
    torch.testing.assert_close(out.recon_loss, reconstruction_loss(preds, targets))
    out.loss.backward()
    assert model.decoder.out_conv.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.vae_encoder.parameters())


def test_latent_chain_saves_the_vae_and_the_decoder_stage_goes_rgb(demo_data, tmp_path, vae_dir):
    s21, dec = tmp_path / "s21", tmp_path / "dec"
    assert main(["train", str(TOK / "stage2_1_proximal.yaml"), *debug_overrides(
        demo_data, s21, "stage.init=debug", "stage.recon_target=vae_latent", f"stage.vae={vae_dir}",
        "train.max_steps=2", "train.logging_steps=1")]) == 0
    records = read_log(s21)
    assert any("recon_loss" in r for r in records)
    assert not any("recon_psnr" in r for r in records)  # a latent MSE is no pixel PSNR
    report = json.loads((s21 / REPORT_FILE).read_text())
    assert {"decoder.out_conv.weight", "decoder.out_conv.bias"} <= set(report["key_map"]["reinitialised"])
    tok = ViQTokenizer.from_pretrained(s21 / VIQ_DIR)
    assert tok.vae is not None and tok.cfg.decoder.out_channels == 16  # vae/ in diffusers' format beside it
    # the decoder stage trains an RGB decoder from the codes of an fsq tokenizer; its adapter starts from the drawer
    fsq = tmp_path / "fsq"
    assert main(["train", str(TOK / "stage2_2_fsq.yaml"), *debug_overrides(
        demo_data, fsq, f"stage.init={s21}", "stage.recon_target=vae_latent", f"stage.vae={vae_dir}",
        "train.max_steps=1")]) == 0
    assert main(["train", str(TOK / "decoder.yaml"), *debug_overrides(
        demo_data, dec, f"stage.init={fsq}", "train.max_steps=2", "train.per_device_batch_size=2")]) == 0
    report = json.loads((dec / REPORT_FILE).read_text())
    assert sorted(report["key_map"]["reinitialised"]) == ["decoder.out_conv.bias", "decoder.out_conv.weight"]
    final = ViQTokenizer.from_pretrained(dec / VIQ_DIR)
    assert final.cfg.decoder.out_channels == 3 and final.vae is None
    assert "decoder.blocks.0.attn.qkv.weight" in report["key_map"]["loaded"]  # the adapter continues the drawer's


@pytest.mark.parametrize("recipe, overrides, message", [
    ("stage2_2_fsq", ["stage.recon_target=vae_latent"], "vae_latent needs stage.vae"),
    ("stage2_2_fsq", ["stage.vae=somewhere"], "stage.vae='somewhere' applies to stage.recon_target=vae_latent"),
    ("stage2_2_fsq", ["stage.recon_target=vae_latent", "stage.vae=v", "stage.perceptual=p.py:f"],
     "stage.perceptual='p.py:f' compares pixels"),
    ("decoder", ["stage.recon_target=none"], "stage.recon_target must be pixels, got 'none'"),
])
def test_bad_latent_settings_are_named(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_recipe(TOK / f"{recipe}.yaml", overrides)


def test_without_diffusers_the_stage_names_the_extra(demo_data, tmp_path, vae_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails, as when not installed
    cfg = latent_cfg(demo_data, tmp_path, vae_dir, "stage2_1_proximal", "stage.init=debug")
    with pytest.raises(ValueError, match=r'pip install "viq\[reference\]"'):
        build_stage_model(cfg, cuda=False)
