"""Every recipe under recipes/ loads into the typed config tree (unknown keys fail), every referenced
DeepSpeed config exists, every family has every stage, and every stage has a debug twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mllm_helpers import RECIPES, REPO

from mllm.config import RecipeConfig, load_recipe, resolve_attention, resolve_dtype, save_recipe
from mllm.model.llm import LLM_PRESETS, LORA_TARGETS, preset_config
from viq.configio import ConfigError

# recipes/bench/ holds `viq bench` configs, a different schema that mllm.tools.bench's tests load
OTHER_SCHEMAS = ("bench", "demo")  # parsed by their own tests (test_bench, test_demo)
YAMLS = sorted(p for p in RECIPES.rglob("*.yaml") if p.relative_to(RECIPES).parts[0] not in OTHER_SCHEMAS)
FAMILIES = ("qwen2.5", "qwen3", "llama3", "smollm2")
STAGES = ("pretrain_projector", "sft_full", "sft_lora")


def test_recipes_exist():
    assert YAMLS, "no recipes found"
    for family in (*FAMILIES, "debug"):
        for stage in STAGES:
            assert (RECIPES / family / f"{stage}.yaml").is_file(), f"missing recipes/{family}/{stage}.yaml"
    assert (RECIPES / "qwen2.5" / "sft_lora_continuous.yaml").is_file()
    # every non-debug recipe has a debug twin of the same stage name (recipes/tokenizer/<size>/ has its
    # own recipes/tokenizer/debug/)
    for path in YAMLS:
        if path.parent.name != "debug":
            assert (path.parent.parent / "debug" / path.name).is_file(), f"{path} has no debug twin"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(RECIPES)) for p in YAMLS])
def test_recipe_parses(path: Path, tmp_path):
    cfg = load_recipe(path)
    assert isinstance(cfg, RecipeConfig)
    if cfg.train.deepspeed:
        ds = REPO / cfg.train.deepspeed
        assert ds.is_file(), f"{path.name} references a missing DeepSpeed config {cfg.train.deepspeed}"
        json.loads(ds.read_text())
    if path.parent.name == "debug":
        assert cfg.model.llm in LLM_PRESETS and cfg.model.tokenizer == "debug" and cfg.data.demo
    else:
        assert cfg.model.llm in LLM_PRESETS, "family recipes name a preset shape (override model.llm)"
        if cfg.trainable.llm == "lora":
            assert preset_config(cfg.model.llm).model_type in LORA_TARGETS
    # the YAML is only a serialisation: dumping and loading gives the same tree
    save_recipe(cfg, tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_deepspeed_configs(name):
    cfg = json.loads((RECIPES / "deepspeed" / f"{name}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == int(name[-1])
    # the Trainer fills these from the recipe, so that one source of truth remains
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto"
    if name == "zero3":
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_unknown_and_bad_keys_are_named():
    recipe = RECIPES / "debug" / "sft_lora.yaml"
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_recipe(recipe, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="trainable.llm"):
        load_recipe(recipe, ["trainable.llm=partly"])
    with pytest.raises(ConfigError, match="trainable.tower"):
        load_recipe(recipe, ["trainable.tower=true"])  # a discrete run has no tower
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_recipe(recipe, ["lora.dropout=1.5"])
    with pytest.raises(ConfigError, match="train.calibration_samples must be positive, got 0"):
        load_recipe(recipe, ["train.calibration_samples=0"])
    with pytest.raises(ConfigError, match="missing required config key model.llm"):
        load_recipe(None, ["data.train=x", "train.output_dir=y", "model.tokenizer=debug"])


def test_stable_override_keys():
    cfg = load_recipe(RECIPES / "debug" / "sft_lora.yaml",
                      ["model.llm=debug-llama", "train.output_dir=/tmp/x", "train.max_steps=7", "lr.projector=0.5"])
    assert (cfg.model.llm, cfg.train.output_dir, cfg.train.max_steps) == ("debug-llama", "/tmp/x", 7)
    assert cfg.part_lr("projector") == 0.5 and cfg.part_lr("tower") == cfg.train.learning_rate


def test_auto_resolution():
    assert resolve_dtype("auto", cuda=False) == torch.float32
    assert resolve_dtype("auto", cuda=True) == torch.bfloat16
    assert resolve_dtype("float32", cuda=True) == torch.float32
    assert resolve_attention("auto", cuda=False) == "sdpa"
    assert resolve_attention("eager", cuda=False) == "eager"
