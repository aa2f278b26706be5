"""Sweep files: variants from a list or a grid, overrides routed to the stages that set them, and the errors
of bad input (unknown keys, no or duplicated variants, metrics whose requirements are missing). The shipped
sweeps parse, and their real-scale forms differ from the debug ones in the chain only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mllm.cli import main as cli_main
from mllm.tools.sweep_config import build_plan, load_sweep
from viq.configio import ConfigError

CHAIN = ["tokenizer/debug/stage2_1_proximal", "tokenizer/debug/stage2_2_fsq"]
SWEEPS = Path(__file__).parents[3] / "recipes" / "sweeps"
SHIPPED = ("proximal", "codebook", "position", "losses")
SHORTENING = ("train.max_steps", "train.per_device_batch_size")  # the debug forms' sweep-wide overrides


def _sweep(tmp_path: Path, **fields) -> Path:
    data = {"name": "t", "chain": CHAIN, "variants": [{"name": "a"}], "seeds": [0, 1],
            "work_dir": str(tmp_path / "work"), **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _plan(tmp_path: Path, **fields):
    return build_plan(load_sweep(_sweep(tmp_path, **fields)))


def test_overrides_go_to_the_stages_that_set_the_key(tmp_path):
    plan = _plan(tmp_path, overrides=["train.max_steps=3", "stage2_2_fsq:stage.noise_sigma=0.02"],
                 variants=[{"name": "l2", "overrides": ["stage.quantizer=l2"]}])
    assert plan.overrides["l2"] == {"stage2_1_proximal": ["train.max_steps=3", "stage.quantizer=l2"],
                                    "stage2_2_fsq": ["train.max_steps=3", "stage.noise_sigma=0.02"]}
    cell = plan.cells[1]
    cfg = plan.recipe(plan.stages[1], cell, {"train": tmp_path / "d.json"})
    assert cfg.train.max_steps == 3 and cfg.stage.noise_sigma == 0.02 and cfg.train.seed == 1
    assert cfg.stage.init == str(cell.folder(tmp_path / "work") / "stage2_1_proximal")
    assert cfg.train.output_dir == str(cell.folder(tmp_path / "work") / "stage2_2_fsq")
    assert cfg.data.train == str(tmp_path / "d.json") and not cfg.data.demo


def test_grid_makes_one_variant_per_combination(tmp_path):
    plan = _plan(tmp_path, variants=[], grid={"stage2_1_proximal:stage.quantizer": ["l2", "linf"],
                                              "stage2_2_fsq:stage.levels": [[8, 5], [4, 4, 4]]})
    assert [v.name for v in plan.variants] == ["quantizer=l2,levels=8x5", "quantizer=l2,levels=4x4x4",
                                               "quantizer=linf,levels=8x5", "quantizer=linf,levels=4x4x4"]
    assert plan.overrides["quantizer=linf,levels=4x4x4"]["stage2_2_fsq"] == ["stage.levels=[4, 4, 4]"]
    assert [c.key for c in plan.cells][:2] == ["quantizer=l2,levels=8x5/0", "quantizer=l2,levels=8x5/1"]


def test_an_unknown_override_key_names_the_key_and_the_stages(tmp_path):
    with pytest.raises(ConfigError, match=r"'stage\.bogus'.*\(stage2_1_proximal, stage2_2_fsq\)"):
        _plan(tmp_path, variants=[{"name": "a", "overrides": ["stage.bogus=1"]}])
    with pytest.raises(ConfigError, match="names stage 'stage3'.*stage2_1_proximal, stage2_2_fsq"):
        _plan(tmp_path, overrides=["stage3:train.max_steps=1"])
    # a key the schema does not have, sent to one stage: the recipe loader names it with the variant and stage
    with pytest.raises(ConfigError, match="variant 'a', stage stage2_2_fsq: unknown config key stage.bogus"):
        _plan(tmp_path, overrides=["stage2_2_fsq:stage.bogus=1"])
    with pytest.raises(ConfigError, match="variant 'a', stage stage2_1_proximal: stage.quantizer: 'fsq8'"):
        _plan(tmp_path, overrides=["stage.quantizer=fsq8"])


def test_no_variants_or_duplicated_names_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no variants"):
        _plan(tmp_path, variants=[])
    with pytest.raises(ConfigError, match="grid key 'train.max_steps' needs a non-empty list"):
        _plan(tmp_path, variants=[], grid={"train.max_steps": []})
    with pytest.raises(ConfigError, match="variant name 'a' appears twice"):
        _plan(tmp_path, variants=[{"name": "a"}, {"name": "a", "overrides": ["train.max_steps=2"]}])
    with pytest.raises(ConfigError, match="variant name 'a/b' must be a folder name"):
        _plan(tmp_path, variants=[{"name": "a/b"}])


def test_a_metric_whose_requirements_are_missing_names_the_metric(tmp_path):
    with pytest.raises(ConfigError, match=r"metric 'vqa' needs an MLLM stage"):
        _plan(tmp_path, metrics=["probe", "vqa"])
    with pytest.raises(ConfigError, match=r"metric 'probe' needs .*demo data"):
        _plan(tmp_path, metrics=["probe"], demo=None)
    with pytest.raises(ConfigError, match=r"metric 'psnr' needs a stage that makes codes"):
        _plan(tmp_path, chain=CHAIN[:1], metrics=["psnr"])
    with pytest.raises(ConfigError, match="unknown metric 'fid'"):
        _plan(tmp_path, metrics=["fid"])


def test_the_command_reports_bad_input_in_one_line(tmp_path, capsys):
    path = _sweep(tmp_path, variants=[{"name": "a", "overrides": ["stage.bogus=1"]}])
    assert cli_main(["sweep", str(path), "--collect"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("viq sweep: error: override key 'stage.bogus'") and err.count("\n") == 1


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_parse_and_their_real_scale_forms_change_the_chain_only(name):
    debug, real = build_plan(load_sweep(f"sweeps/{name}")), build_plan(load_sweep(f"sweeps/g/{name}"))
    assert len(debug.variants) >= 3 and debug.sweep.seeds == (0, 1, 2) and debug.sweep.demo.train
    assert [s.name for s in debug.stages] == [s.name for s in real.stages]
    assert all("tokenizer/debug/" in str(s.recipe) for s in debug.stages)
    assert all("tokenizer/g/" in str(s.recipe) for s in real.stages)
    assert real.variants == debug.variants and real.sweep.metrics == debug.sweep.metrics
    # the variants' own overrides reach the same stages in both forms; the debug form adds its shortening
    for v in debug.variants:
        for stage, items in debug.overrides[v.name].items():
            assert real.overrides[v.name][stage] == [o for o in items if o.split("=")[0] not in SHORTENING]


def test_dry_run_builds_every_stage_of_every_variant(tmp_path, capsys):
    path = _sweep(tmp_path, variants=[{"name": "two", "overrides": ["stage2_2_fsq:stage.levels=[8,8]"]},
                                      {"name": "six", "overrides": ["stage2_2_fsq:stage.levels=[8,8,8,5,5,5]"]}])
    assert cli_main(["sweep", str(path), "--dry-run"]) == 0
    counts = json.loads((tmp_path / "work" / "dry_run.json").read_text())
    assert set(counts) == {"two", "six"} and set(counts["two"]) == {"stage2_1_proximal", "stage2_2_fsq"}
    assert counts["two"]["stage2_1_proximal"] == counts["six"]["stage2_1_proximal"]
    # four more code dimensions: each adds a 64-wide row to the projection into the code space, a 64-wide
    # column to the one out of it, and one bias
    two, six = counts["two"]["stage2_2_fsq"]["head"], counts["six"]["stage2_2_fsq"]["head"]
    assert six - two == 4 * (64 + 64 + 1)
    out = capsys.readouterr().out
    assert "six" in out and "stage2_2_fsq" in out and "M trainable" in out
    assert not (tmp_path / "work" / "cells").exists()  # nothing trained
