"""A run stopped at step 3 and resumed reproduces the uninterrupted run's losses exactly (CPU fp32,
seeded data order, LoRA dropout: the RNG state travels with the checkpoint)."""

from __future__ import annotations

import shutil

import pytest
from mllm_helpers import RECIPES, debug_overrides, step_losses

from mllm.cli import main


@pytest.mark.parametrize("recipe", ["sft_lora", "sft_full"])
def test_resume_reproduces_losses(recipe, demo_data, tmp_path):
    path = str(RECIPES / "debug" / f"{recipe}.yaml")
    extra = ("train.max_steps=6", "train.save_steps=3", "train.logging_steps=1")
    full = tmp_path / "uninterrupted"
    assert main(["train", path, *debug_overrides(demo_data, full, *extra)]) == 0
    reference = step_losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # the interrupted run: everything it had written by step 3 is checkpoint-3 (a run configured for 6
    # steps, so the LR schedule is the same); it restarts in a fresh process state from there
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    assert main(["train", path, *debug_overrides(demo_data, resumed, *extra, "train.resume=true")]) == 0
    again = step_losses(resumed)
    assert sorted(again) == [4, 5, 6], "the resumed run must start after step 3"
    for step in (4, 5, 6):
        assert again[step] == reference[step], (step, again[step], reference[step])
