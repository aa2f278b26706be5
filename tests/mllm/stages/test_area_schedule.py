"""stage.area_schedule on the debug stage 1: the first half of the steps trains on small images, the second
on large ones (the reference's 384² -> 768² curriculum in miniature), the run's length follows from its
epochs, the data summary counts each phase, a run killed mid-curriculum resumes on the same items, and
`viq data inspect --phase K` shows each phase's data."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from mllm_helpers import RECIPES, debug_overrides, step_losses

from mllm.cli import main
from mllm.config import load_recipe
from mllm.data.phases import PhasedDataset
from mllm.model.llm import load_text_tokenizer
from mllm.stages.areas import area_phases
from mllm.stages.llm_stage import build_stage_model
from mllm.tools.inspect_data import inspect_recipe
from mllm.tools.inspect_data import main as data_main
from mllm.train.data_setup import build_datasets
from mllm.train.trainer import prepare_trainer
from viq.configio import ConfigError

STAGE1 = RECIPES / "tokenizer" / "debug" / "stage1.yaml"
SMALL, LARGE = 1024, 8192  # pixels: 32² and about 90², so about 4 and 32 patches of 16²
SCHEDULE = (f"stage.area_schedule=[{{until: 0.5, area_range: [{SMALL}, {SMALL}]}}, "
            f"{{until: 1.0, area_range: [{LARGE}, {LARGE}]}}]")


def overrides(demo, out, *extra):
    return debug_overrides(demo, out, "stage.area_range=null", SCHEDULE, "train.logging_steps=1", *extra)


def test_steps_walk_through_the_phases(demo_data, tmp_path):
    cfg = load_recipe(STAGE1, overrides(demo_data, tmp_path, "train.max_steps=-1", "train.num_epochs=1"))
    trainer = prepare_trainer(cfg, build=build_stage_model, phases=area_phases(cfg))
    try:
        data = trainer.train_dataset
        assert isinstance(data, PhasedDataset) and len(data.parts) == 2
        # one pass: half the steps' worth of each phase's packs (1 pack per step)
        steps = trainer.args.max_steps
        assert steps == data.total_steps(1.0, 1) == math.ceil((len(data.parts[0]) + len(data.parts[1])) / 2)
        patches = [int(batch["image_grids"].prod(dim=1).max()) for batch in trainer.get_train_dataloader()]
        half = data.step_bounds(steps)[0]
        assert len(patches) == steps and 0 < half < steps
        # the largest image of each step, in patches: about 4 (32²) in phase 0, about 32 (90²) in phase 1
        assert max(patches[:half]) <= 8 < 32 <= min(patches[half:])
        summary = json.loads((tmp_path / "data_summary.json").read_text())["train"]
        assert [p["kept"] for p in summary["phases"]] == [48, 48]
    finally:
        trainer.release_output_dir()


def test_resume_mid_curriculum_reproduces_losses(demo_data, tmp_path):
    extra = ("train.max_steps=4", "train.save_steps=2")
    full = tmp_path / "uninterrupted"
    assert main(["train", str(STAGE1), *overrides(demo_data, full, *extra)]) == 0
    reference = step_losses(full)
    assert sorted(reference) == [1, 2, 3, 4]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    assert main(["train", str(STAGE1), *overrides(demo_data, resumed, *extra, "train.resume=true")]) == 0
    again = step_losses(resumed)
    assert sorted(again) == [3, 4]
    assert all(again[s] == reference[s] for s in (3, 4)), (again, reference)


@pytest.mark.parametrize("override, match", [
    ("stage.area_schedule=[{until: 1.0, area_range: [1024, 1024]}]", "area_range.*area_schedule both"),
    ("stage.area_schedule=[{until: 0.5, area_range: [1024, 1024]}]", r"last be 1\.0.*\[0\.5\]"),
    ("stage.area_schedule=[{until: 0.7, area_range: [1, 2]}, {until: 0.3, area_range: [1, 2]}, "
     "{until: 1.0, area_range: [1, 2]}]", r"increase.*\[0\.7, 0\.3, 1\.0\]"),
    ("stage.area_schedule=[{until: 1.0, area_range: [9, 3]}]", r"area_range.*\[9, 3\]"),
    ("stage.area_schedule=[{until: 1.5, area_range: [1, 2]}]", r"until must be in \(0, 1\], got 1\.5"),
])
def test_bad_schedules_are_named(override, match):
    extra = [] if "both" in match else ["stage.area_range=null"]
    with pytest.raises(ConfigError, match=match):
        load_recipe(STAGE1, [*extra, override])


def test_data_inspect_shows_each_phase(demo_data, tmp_path):
    cfg = load_recipe(STAGE1, overrides(demo_data, tmp_path))
    grids = {k: [im.grid for s in inspect_recipe(cfg, n=8, phase=k).samples for im in s.images] for k in (0, 1)}
    assert all(h * w <= 8 for h, w in grids[0]) and all(h * w >= 24 for h, w in grids[1])
    with pytest.raises(ValueError, match="--phase 2: the recipe's training data has 2 phase"):
        inspect_recipe(cfg, phase=2)
    assert data_main(["inspect", str(STAGE1), *overrides(demo_data, tmp_path), "--phase", "5"]) == 1


def test_each_image_file_is_checked_once_across_phases(demo_data, tmp_path, monkeypatch):
    import mllm.data.dataset as dataset_module

    checked = []
    real = dataset_module.verify_image
    monkeypatch.setattr(dataset_module, "verify_image", lambda path: checked.append(path) or real(path))
    cfg = load_recipe(STAGE1, overrides(demo_data, tmp_path))
    train, _, _ = build_datasets(cfg, load_text_tokenizer("debug", init="random"), 16, area_phases(cfg))
    assert isinstance(train, PhasedDataset) and len(train.parts) == 2
    assert len(checked) == len(set(checked)) == 48  # one file per demo sample, read once for both phases


def test_a_phase_that_loses_its_samples_is_named(demo_data, tmp_path):
    # at 256 tokens a row holds the debug images of phase 0, not a 700² image (about 500 patches)
    schedule = ("stage.area_schedule=[{until: 0.5, area_range: [1024, 1024]}, "
                "{until: 1.0, area_range: [490000, 490000]}]")
    cfg = load_recipe(STAGE1, debug_overrides(demo_data, tmp_path, "stage.area_range=null", schedule))
    with pytest.raises(ValueError, match=r"phase 1 of the schedule \(until 1\.0\): no usable samples.*too long"):
        build_datasets(cfg, load_text_tokenizer("debug", init="random"), 16, area_phases(cfg))
