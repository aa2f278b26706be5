"""A DeepSpeed config that contradicts the recipe or the launch, and a ZeRO-3 checkpoint resumed on another number
of ranks, are refused with both values named before any model is built (mllm.train.zero)."""

from __future__ import annotations

import json
import sys

import pytest
from mllm_helpers import RECIPES, debug_overrides
from multirank import ZERO3, run_bounded

from mllm.config import load_recipe
from mllm.train.zero import check_resume_world_size, check_zero_config, load_zero_config
from viq.configio import ConfigError

SHIPPED = sorted((RECIPES / "deepspeed").glob("*.json"))


def recipe(*overrides: str):
    return load_recipe("debug/sft_full", ["train.output_dir=unused", *overrides])


def shipped(name: str = "zero3") -> dict:
    return load_zero_config(f"recipes/deepspeed/{name}.json")[1]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_agree_with_every_recipe_and_launch(path):
    _, ds = load_zero_config(str(path))
    for world in (1, 2, 3, 8):
        for cuda in (False, True):
            check_zero_config(ds, recipe("train.per_device_batch_size=3", "train.grad_accum=5"), world, cuda, "x")


@pytest.mark.parametrize(("key", "value", "named"), [
    ("train_micro_batch_size_per_gpu", 4, "train.per_device_batch_size=2"),
    ("gradient_accumulation_steps", 1, "train.grad_accum=3"),
])
def test_a_batch_setting_other_than_the_recipes_is_refused(key, value, named):
    ds = {**shipped(), key: value}
    with pytest.raises(ConfigError) as err:
        check_zero_config(ds, recipe("train.per_device_batch_size=2", "train.grad_accum=3"), 2, False, "z.json")
    assert f"z.json sets {key}={value}" in str(err.value) and named in str(err.value)
    # the recipe's own values are accepted
    check_zero_config({**ds, key: int(named.split("=")[1])}, recipe("train.per_device_batch_size=2",
                                                                     "train.grad_accum=3"), 2, False, "z.json")


def test_a_total_batch_other_than_the_recipes_at_this_world_size_is_refused():
    cfg = recipe("train.per_device_batch_size=2", "train.grad_accum=3")
    check_zero_config({**shipped(), "train_batch_size": 24}, cfg, 4, False, "z.json")  # 2 x 3 x 4
    with pytest.raises(ConfigError, match=r"train_batch_size=24 but the recipe gives 12 on 2 ranks"):
        check_zero_config({**shipped(), "train_batch_size": 24}, cfg, 2, False, "z.json")


def test_a_world_size_that_does_not_divide_the_total_batch_is_refused():
    with pytest.raises(ConfigError, match=r"train_batch_size=24, which the launch's world size of 5 ranks does not"):
        check_zero_config({**shipped(), "train_batch_size": 24}, recipe(), 5, False, "z.json")


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_half_precision_on_a_cpu_run_is_refused(key):
    with pytest.raises(ConfigError, match=rf"z.json sets {key}.enabled=true but this run has no GPU"):
        check_zero_config({**shipped(), key: {"enabled": True}}, recipe(), 1, False, "z.json")


def test_a_precision_other_than_the_recipes_is_refused_on_a_gpu():
    check_zero_config({**shipped(), "bf16": {"enabled": True}}, recipe("model.dtype=bfloat16"), 1, True, "z.json")
    with pytest.raises(ConfigError, match=r"bf16.enabled=false but the recipe's model.dtype='bfloat16' trains in "
                                          r"bfloat16"):
        check_zero_config({**shipped(), "bf16": {"enabled": False}}, recipe("model.dtype=bfloat16"), 1, True, "z")
    with pytest.raises(ConfigError, match=r"fp16.enabled=true but the recipe's model.dtype='auto' trains in bfloat16"):
        check_zero_config({**shipped(), "fp16": {"enabled": True}}, recipe(), 1, True, "z")


def test_an_unreadable_config_is_named(tmp_path):
    bad = tmp_path / "zero.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"train.deepspeed={str(bad)!r}: cannot read .* as JSON"):
        load_zero_config(str(bad))


def zero3_checkpoint(root, ranks: int):
    ckpt = root / "checkpoint-2"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    for r in range(ranks):
        for kind in ("model", "optim"):
            (ckpt / "global_step2" / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt").write_bytes(b"")
    return ckpt


def test_resuming_zero3_on_another_world_size_says_how_to_convert(tmp_path):
    ckpt = zero3_checkpoint(tmp_path, ranks=2)
    check_resume_world_size(ckpt, 2, shipped())
    with pytest.raises(ConfigError) as err:
        check_resume_world_size(ckpt, 4, shipped())
    text = str(err.value)
    assert "written by 2 ranks, but this launch has 4" in text
    assert f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt / 'global_step2'}" in text
    assert '"load_universal": true' in text
    # a universal checkpoint loads at any world size (tests/mllm/train/test_zero_resize.py), once converted
    universal = {**shipped(), "checkpoint": {"load_universal": True}}
    with pytest.raises(ConfigError, match=r"has none \(no latest_universal\): convert it"):
        check_resume_world_size(ckpt, 4, universal)
    (ckpt / "latest_universal").write_text("global_step2_universal")
    check_resume_world_size(ckpt, 4, universal)


def test_zero2_checkpoints_are_not_held_to_a_world_size(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    (ckpt / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"")
    check_resume_world_size(ckpt, 3, shipped("zero2"))


def test_the_run_stops_before_building_a_model(demo_data, tmp_path):
    bad = tmp_path / "zero3_micro4.json"
    bad.write_text(json.dumps({**json.loads(ZERO3.read_text()), "train_micro_batch_size_per_gpu": 4}))
    # a process of its own: a DeepSpeed recipe without a launcher publishes a world of one in the environment
    proc = run_bounded([sys.executable, "-m", "mllm.cli", "train", str(RECIPES / "debug" / "sft_full.yaml"),
                        *debug_overrides(demo_data, tmp_path / "run", f"train.deepspeed={bad}")], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{bad} sets train_micro_batch_size_per_gpu=4 but the recipe has train.per_device_batch_size=1" in \
        proc.stderr
    assert "built MLLM" not in proc.stdout + proc.stderr  # mllm.model.build logs it once the model exists
