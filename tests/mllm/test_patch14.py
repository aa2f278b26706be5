"""A patch-14 encoder end to end: the grid maths take the patch size from the encoder config everywhere
(encode, extract, the data set's grids, training from codes and from pixels), also for a tower started from
a fixed-resolution patch-14 SigLIP checkpoint (tokenizer stage 1, its teacher that same checkpoint)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides, read_log
from transformers import SiglipVisionConfig, SiglipVisionModel

from mllm.cli import main
from mllm.data.codes import CodeStore
from mllm.data.readers import read_samples
from mllm.model.layout import VIQ_DIR
from mllm.tools.extract import extract
from viq import ViQTokenizer
from viq.config import preset
from viq.image import load_image, predict_grid, preprocess

SETTINGS = ["data.image.area=3136", "data.image.multiple=28"]  # 56 x 56 pixels = 4 x 4 patches of 14


@pytest.fixture(scope="module")
def patch14_dir(tmp_path_factory):
    cfg = preset("debug")
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, patch_size=14),
                              decoder=dataclasses.replace(cfg.decoder, upscale=14))
    path = tmp_path_factory.mktemp("patch14")
    torch.manual_seed(0)
    ViQTokenizer(cfg).save_pretrained(path)
    return path


def test_encode_counts_14_pixel_patches(patch14_dir):
    tok = ViQTokenizer.from_pretrained(patch14_dir)
    image = (np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8)
    pixels, grid = preprocess(image, patch_size=tok.cfg.encoder.patch_size, mode="none")
    codes = tok.encode([pixels])[0]
    assert grid == codes.grid
    assert codes.grid == (5, 8)  # ceil(70 / 14), ceil(100 / 14)
    assert codes.indices.numel() == 5 * 8 * tok.codes_per_patch
    assert tok.decode([codes])[0].size == (8 * 14, 5 * 14)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_extract_and_train_two_steps(patch14_dir, demo_data, tmp_path):
    codes = tmp_path / "codes"
    extract(patch14_dir, demo_data["train"], codes, preprocess={"area": 3136, "multiple": 28}, progress=False)
    store = CodeStore(codes)
    assert store.patch_size == 14
    for sample in list(read_samples(demo_data["train"]))[:5]:
        ref = sample.images[0]
        width, height = load_image(ref.path).size
        key = next(k for k in store.keys() if ref.path.name in k)
        assert store.grid(key) == predict_grid(width, height, patch_size=14, area=3136, multiple=28)
    for name, extra in (("codes", [f"data.codes={codes}"]), ("pixels", ["model.visual=continuous"])):
        out = tmp_path / name
        args = [*debug_overrides(demo_data, out), f"model.tokenizer={patch14_dir}", "train.max_steps=2",
                "train.logging_steps=1", *SETTINGS, *extra]
        assert main(["train", str(RECIPES / "debug" / "sft_full.yaml"), *args]) == 0
        losses = [rec["loss"] for rec in _log(out) if "loss" in rec]
        assert len(losses) == 2 and all(np.isfinite(losses))


def test_codes_of_another_patch_size_or_area_are_refused(patch14_dir, demo_data, tmp_path):
    codes = tmp_path / "codes"
    extract(patch14_dir, demo_data["train"], codes, preprocess={"area": 3136, "multiple": 28}, progress=False)
    out = tmp_path / "run"
    args = [*debug_overrides(demo_data, out), f"model.tokenizer={patch14_dir}", "train.max_steps=1",
            f"data.codes={codes}", "data.image.area=4096", "data.image.multiple=28"]
    with pytest.raises(ValueError, match="extracted with image settings .*area=3136.*data.image.*area=4096"):
        main(["train", str(RECIPES / "debug" / "sft_full.yaml"), *args])


def test_stage1_from_a_fixed_resolution_patch14_siglip(demo_data, tmp_path):
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             image_size=56, patch_size=14)  # the debug tokenizer's width; a 4 x 4 table
    siglip = tmp_path / "siglip"
    SiglipVisionModel(cfg).save_pretrained(siglip)
    out = tmp_path / "stage1"
    args = [*debug_overrides(demo_data, out), f"model.siglip2={siglip}", "train.max_steps=2", "train.logging_steps=1",
            "stage.teacher_resolution=56", *SETTINGS]
    assert main(["train", str(RECIPES / "tokenizer" / "debug" / "stage1.yaml"), *args]) == 0
    records = [rec for rec in read_log(out) if "distill_loss" in rec]
    assert len(records) == 2 and all(np.isfinite(rec["distill_loss"]) for rec in records)
    tok = ViQTokenizer.from_pretrained(out / VIQ_DIR)
    assert (tok.cfg.encoder.patch_size, tok.cfg.encoder.pos_grid) == (14, 4)
    pixels, grid = preprocess(np.zeros((70, 100, 3), np.uint8), patch_size=14, mode="none")
    assert tok.encode([pixels])[0].grid == grid == (5, 8)
