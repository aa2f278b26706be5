"""Every recipe under recipes/ loads into the typed config tree (unknown keys fail), every referenced
DeepSpeed config exists, every family has every stage, and every stage has a debug twin. Recipes derive from
a base (`base:`), and `viq train --print-config` shows the resolved whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mllm_helpers import RECIPES, REPO

from mllm.cli import main
from mllm.config import RecipeConfig, load_recipe, resolve_attention, resolve_dtype, save_recipe
from mllm.model.llm import LLM_PRESETS, LORA_TARGETS, preset_config, random_shape, weights_source
from viq.configio import ConfigError, load_yaml

# recipes/bench/ holds `viq bench` configs, a different schema that mllm.tools.bench's tests load
OTHER_SCHEMAS = ("bench", "demo", "sweeps")  # parsed by their own tests (test_bench, test_demo, test_sweep_config)
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


def _chain(path: Path) -> list[Path]:
    """The recipe file and the files it derives from (base:)."""
    files = [path]
    while (base := (yaml.safe_load(files[-1].read_text()) or {}).get("base")) is not None:
        files.append((files[-1].parent / base).resolve())
    return files


def _demo_runs() -> list[tuple[str, Path, list[str], list[Path]]]:
    """Every (name, recipe, overrides, files that say it) that `viq demo` trains through the LLM."""
    runs = []
    for demo in sorted((RECIPES / "demo").glob("*.yaml")):
        raw = load_yaml(demo)
        for recipe in raw.get("tokenizer_recipes") or []:
            path = REPO / recipe
            overrides = list(raw.get("tokenizer_overrides") or [])
            runs.append((f"{demo.name}:{recipe}", path, overrides, [demo, *_chain(path)]))
        path = REPO / raw["mllm_recipe"]
        runs.append((f"{demo.name}:{raw['mllm_recipe']}", path, list(raw.get("mllm_overrides") or []),
                     [demo, *_chain(path)]))
    return runs


RUNS = [(str(p.relative_to(RECIPES)), p, [], _chain(p)) for p in YAMLS] + _demo_runs()


@pytest.mark.parametrize("name,path,overrides,files", RUNS, ids=[r[0] for r in RUNS])
def test_no_recipe_trains_random_weights_without_saying_so(name, path, overrides, files):
    cfg = load_recipe(path, overrides)  # a ViQ preset without tokenizer_init: random is refused here

    def said(key: str) -> bool:
        return any(f"{key}: random" in f.read_text() or f"{key}=random" in f.read_text() for f in files)

    if random_shape(cfg.model.llm, cfg.model.llm_init):
        assert said("llm_init"), f"{name} builds random LLM weights without saying llm_init: random in {files}"
    else:
        weights_source(cfg.model.llm)  # a shape-only preset raises: it has no weights
    assert cfg.model.tokenizer_init == "pretrained" or said("tokenizer_init"), name


def test_a_random_vision_tokenizer_must_be_asked_for():
    with pytest.raises(ConfigError, match="model.tokenizer='so400m' is a ViQ architecture with random weights"):
        load_recipe(RECIPES / "qwen2.5" / "sft_lora.yaml", ["model.tokenizer=so400m"])
    cfg = load_recipe(RECIPES / "qwen2.5" / "sft_lora.yaml", ["model.tokenizer=so400m", "model.tokenizer_init=random"])
    assert cfg.model.tokenizer_init == "random"
    # a stage 1 whose tower comes from SigLIP2 uses no random tokenizer weights
    assert load_recipe(RECIPES / "tokenizer" / "so400m" / "stage1.yaml").model.tokenizer == "so400m"


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


# the roots hold whole recipes; every other recipe of these folders derives from one and holds only what differs
ROOTS = {f"qwen2.5/{s}.yaml" for s in STAGES} | {"debug/pretrain_projector.yaml"} | {
    f"tokenizer/so400m/{p.name}" for p in (RECIPES / "tokenizer" / "so400m").glob("*.yaml")}
DERIVED = sorted(str(p.relative_to(RECIPES)) for d in (*FAMILIES, "debug", "tokenizer/g", "tokenizer/so400m")
                 for p in (RECIPES / d).glob("*.yaml") if str(p.relative_to(RECIPES)) not in ROOTS)


def _keys(path: Path) -> int:
    """Lines that set something: neither comments nor blank."""
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))


@pytest.mark.parametrize("name", DERIVED)
def test_derived_recipes_hold_only_what_differs(name):
    raw = yaml.safe_load((RECIPES / name).read_text())
    assert "base" in raw, f"recipes/{name} copies its base instead of naming it with base:"
    base = ((RECIPES / name).parent / raw["base"]).resolve().relative_to(RECIPES.resolve()).as_posix()
    # one level below a root, so that a recipe reads with one other file; a continuous twin derives from its sft_lora
    assert base in ROOTS or name.endswith("sft_lora_continuous.yaml"), f"recipes/{name} derives from {base}"
    assert _keys(RECIPES / name) <= 15, f"recipes/{name} is long for a derived recipe ({_keys(RECIPES / name)} lines)"


def test_roots_are_whole_recipes():
    for name in ROOTS:
        assert "base" not in yaml.safe_load((RECIPES / name).read_text()), name
    assert len(DERIVED) >= 16  # 3 families x 3 stages, sft_lora_continuous, 3 debug twins, 4 tokenizer/g stages


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_mappings_and_replaces_the_rest(tmp_path):
    _write(tmp_path / "root.yaml", "a: {x: 1, y: [1, 2], z: {deep: 1, keep: 2}}\nb: 3\nc: keep\n")
    _write(tmp_path / "mid.yaml", "base: root.yaml\na: {y: [9], z: {deep: 5}}\nb: null\n")
    leaf = _write(tmp_path / "sub" / "leaf.yaml", "base: ../mid.yaml  # relative to this file's folder\na: {x: 7}\n")
    assert load_yaml(leaf) == {"a": {"x": 7, "y": [9], "z": {"deep": 5, "keep": 2}}, "b": None, "c": "keep"}
    # through a recipe: the merged tree is validated as a whole, and overrides apply after the merge
    child = _write(tmp_path / "r" / "child.yaml", f"base: {RECIPES / 'debug' / 'sft_lora.yaml'}\n"
                                                 "lora: {r: 4}\ntrain: {output_dir: out/child}\n")
    cfg = load_recipe(child, ["train.max_steps=3"])
    parent = load_recipe(RECIPES / "debug" / "sft_lora.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.output_dir, cfg.train.max_steps) == (4, parent.lora.alpha,
                                                                                         "out/child", 3)
    assert cfg.data == parent.data and cfg.model == parent.model


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\nx: 1\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_yaml(a)
    assert "a.yaml" in str(err.value) and "b.yaml" in str(err.value)
    own = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml.*cycle"):
        load_yaml(own)


def test_missing_base_is_an_error_naming_it(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: nowhere/parent.yaml\nx: 1\n")
    with pytest.raises(ConfigError, match=r"nowhere/parent\.yaml does not exist"):
        load_yaml(child)
    with pytest.raises(ConfigError, match="base must be the path"):
        load_yaml(_write(tmp_path / "bad.yaml", "base: [a.yaml]\n"))


def test_print_config_shows_the_resolved_recipe(capsys, tmp_path):
    assert main(["train", "qwen3/sft_lora", "train.max_steps=7", "lora.r=4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["llm"] == "qwen3-0.6b"  # the recipe's own
    assert printed["train"]["max_steps"] == 7 and printed["lora"]["r"] == 4  # overrides
    assert printed["lora"]["alpha"] == 256 and printed["train"]["deepspeed"] == "recipes/deepspeed/zero2.json"  # base
    # the data set name is resolved to its files (which need not exist to print a recipe)
    assert (printed["data"]["train"], printed["data"]["image_root"]) == ("data/llava/llava_v1_5_mix665k.json",
                                                                          "data/llava/sft_images")
    # every key is printed, defaults included, and the print loads back as the same recipe
    assert printed["train"]["adam_betas"] == [0.9, 0.999]
    again = _write(tmp_path / "printed.yaml", yaml.safe_dump(printed))
    assert load_recipe(again) == load_recipe("qwen3/sft_lora", ["train.max_steps=7", "lora.r=4",
                                                               "data.train=data/llava/llava_v1_5_mix665k.json",
                                                               "data.image_root=data/llava/sft_images"])


def test_print_config_reports_a_bad_override(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "debug/sft_full", "train.max_stepz=1", "--print-config"])
    assert exc.value.code == 2 and "train.max_stepz" in capsys.readouterr().err


def test_packaged_files_resolve_from_any_directory(tmp_path, monkeypatch):
    # a recipe's train.deepspeed names recipes/deepspeed/*.json; from a folder without recipes/ (an installed
    # package) it resolves to the shipped file, and a local file of the same path wins where there is one
    from mllm.config import PACKAGED_RECIPES, resolve_recipe

    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("recipes/deepspeed/zero2.json") == PACKAGED_RECIPES / "deepspeed" / "zero2.json"
    assert resolve_recipe("debug/sft_full") == PACKAGED_RECIPES / "debug" / "sft_full.yaml"
    local = tmp_path / "recipes" / "deepspeed" / "zero2.json"
    local.parent.mkdir(parents=True)
    local.write_text("{}")
    assert resolve_recipe("recipes/deepspeed/zero2.json").resolve() == local
    with pytest.raises(ConfigError, match="no/such"):
        resolve_recipe("no/such")
