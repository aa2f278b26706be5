"""The distillation teacher (mllm.stages.teacher): the chain's original tower by default, recorded by stage 1
and derived by the later stages; the previous stage's encoder on request; fixed-resolution input as
transformers feeds a SigLIP tower; bad teachers named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides
from transformers import SiglipVisionConfig, SiglipVisionModel

from mllm.cli import main
from mllm.config import load_recipe
from mllm.model.layout import VIQ_DIR
from mllm.stages.llm_stage import build_stage_model
from mllm.stages.report import REPORT_FILE
from mllm.stages.teacher import FrozenTeacher, build_teacher
from viq.configio import ConfigError
from viq.convert import load_siglip2
from viq.tokenizer import ViQTokenizer

TOK = RECIPES / "tokenizer" / "debug"


def siglip_dir(path: Path, width: int = 64, patch: int = 16, image_size: int = 64) -> Path:
    """A tiny random fixed-resolution SigLIP tower (the debug tokenizer is 64 wide)."""
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                             num_attention_heads=4, image_size=image_size, patch_size=patch)
    SiglipVisionModel(cfg).save_pretrained(path)
    return path


def stage_cfg(name: str, demo, out: Path, *extra: str):
    return load_recipe(TOK / f"{name}.yaml", debug_overrides(demo, out, *extra))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_stage_2_2_distils_from_the_original_tower(demo_data, tmp_path):
    siglip = siglip_dir(tmp_path / "siglip")
    s1, s21 = tmp_path / "s1", tmp_path / "s21"
    steps = ("train.max_steps=2", "train.logging_steps=1")
    assert main(["train", str(TOK / "stage1.yaml"),
                 *debug_overrides(demo_data, s1, *steps, f"model.siglip2={siglip}")]) == 0
    assert main(["train", str(TOK / "stage2_1_proximal.yaml"),
                 *debug_overrides(demo_data, s21, *steps, f"stage.init={s1}", "stage.teacher=original")]) == 0
    record = {"siglip": str(siglip.resolve())}
    for out in (s1, s21):
        assert json.loads((out / REPORT_FILE).read_text())["chain_teacher"] == record
    original = load_siglip2(siglip)
    stage_2_1 = ViQTokenizer.from_pretrained(s21 / VIQ_DIR).encoder
    assert not same_weights(stage_2_1, original)  # two steps moved the tower
    cfg = stage_cfg("stage2_2_fsq", demo_data, tmp_path / "s22", f"stage.init={s21}", "stage.teacher=original")
    model = build_stage_model(cfg, cuda=False).model
    assert same_weights(model.teacher.encoder, original)
    assert model.stage_report["teacher"]["loaded"] == record
    cfg = stage_cfg("stage2_2_fsq", demo_data, tmp_path / "s22", f"stage.init={s21}", "stage.teacher=previous")
    model = build_stage_model(cfg, cuda=False).model
    assert same_weights(model.teacher.encoder, stage_2_1)
    assert model.stage_report["chain_teacher"] == record  # passed on unchanged


def test_original_needs_a_recorded_chain(demo_data, tmp_path):
    ViQTokenizer.from_preset("debug", seed=0).save_pretrained(tmp_path / "authors" / VIQ_DIR)
    cfg = stage_cfg("stage2_2_fsq", demo_data, tmp_path, f"stage.init={tmp_path / 'authors'}",
                    "stage.teacher=original")
    with pytest.raises(ValueError, match=r"stage\.teacher=original: .* no stage_report\.json .*stage\.teacher=DIR"):
        build_teacher(cfg, ViQTokenizer.from_preset("debug").encoder)


def test_a_teacher_of_another_width_is_named(demo_data, tmp_path):
    narrow = siglip_dir(tmp_path / "narrow", width=32)
    cfg = stage_cfg("stage1", demo_data, tmp_path, f"stage.teacher={narrow}")
    with pytest.raises(ValueError, match=r"has width 32, the student's MAP output has width 64"):
        build_teacher(cfg, ViQTokenizer.from_preset("debug").encoder)


def test_fixed_resolution_input_as_transformers_feeds_siglip(tmp_path):
    """A patch-14 tower at 62 px (like 384 px with patch 14): the image is resized to the square and the
    remainder beyond the last whole patch dropped, as transformers' valid-padding conv does."""
    path = siglip_dir(tmp_path / "p14", width=32, patch=14, image_size=62)
    hf = SiglipVisionModel.from_pretrained(path).eval()
    teacher = FrozenTeacher(load_siglip2(path), resolution=62)
    image = torch.rand(3, 50, 90, generator=torch.Generator().manual_seed(0)) * 2 - 1
    square = torch.nn.functional.interpolate(image[None], size=(62, 62), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = hf(pixel_values=square).pooler_output
    torch.testing.assert_close(teacher([image]), want, atol=1e-4, rtol=0)


def test_student_table_resampled_teacher_keeps_its_own(demo_data, tmp_path):
    """stage.pos_grid resamples the student's table once at stage-1 start (the reference: SigLIP2-g 24 -> 128);
    the teacher is the checkpoint as published, with its native table."""
    siglip = siglip_dir(tmp_path / "siglip")
    cfg = stage_cfg("stage1", demo_data, tmp_path / "s1", f"model.siglip2={siglip}", "stage.pos_grid=8")
    model = build_stage_model(cfg, cuda=False).model
    student, original = model.visual.encoder, load_siglip2(siglip)
    assert (student.cfg.pos_grid, student.cfg.pos_antialias) == (8, False)
    torch.testing.assert_close(student.pos_embed, load_siglip2(siglip, pos_grid=8).pos_embed)
    assert model.tokenizer.cfg.encoder.pos_grid == 8  # the saved config describes the resampled tower
    assert same_weights(model.teacher.encoder, original) and model.teacher.encoder.cfg.pos_grid == 4
    with pytest.raises(ConfigError, match=r"stage\.pos_grid=8 applies to stage\.kind=stage1"):
        stage_cfg("stage2_2_fsq", demo_data, tmp_path, "stage.pos_grid=8")
