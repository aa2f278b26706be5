"""``viq sweep`` end to end on the smallest chain (one FSQ stage from the debug preset, two steps): two
variants x two seeds, a cell killed halfway and resumed, the report's table and its aggregation."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

import mllm.tools.sweep as sweep_mod
from mllm.demo.data import generate_demo
from mllm.tools.sweep import CELL_FILE, run_sweep
from mllm.tools.sweep_config import load_sweep

SWEEP = {
    "name": "tiny",
    "chain": ["tokenizer/debug/stage2_2_fsq"],
    "overrides": ["stage.init=debug", "train.max_steps=2", "stage2_2_fsq:stage.calibration_images=4",
                  "stage2_2_fsq:stage.stability_every=0"],
    "variants": [{"name": "small", "overrides": ["stage.levels=[4,4]"], "paper": 1.0},
                 {"name": "big", "overrides": ["stage.levels=[8,5,5,5]"], "paper": 2.0}],
    "seeds": [0, 1],
    "metrics": ["probe", "psnr", "codebook", "stability", "seconds"],
    "demo": {"n_train": 60, "n_val": 2, "n_test": 30},
    "eval_images": 8,
}


class Killed(Exception):
    """Stands for the process being killed in the middle of a stage."""


@pytest.mark.slow
def test_sweep_runs_resumes_a_killed_cell_and_reports(tmp_path, monkeypatch):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "work_dir": str(tmp_path / "work"),
                                    "report_dir": str(tmp_path / "report")}))
    sweep = load_sweep(path)
    real_run_stage, started = sweep_mod.run_stage, []

    def killed_in_big_seed0(cfg):
        out = Path(cfg.train.output_dir)
        started.append(out.parent.relative_to(tmp_path / "work" / "cells").as_posix())
        if started[-1] == "big/seed0":
            out.mkdir(parents=True)
            (out / "log.jsonl").write_text('{"step": 1, "killed": true}\n')
            raise Killed
        return real_run_stage(cfg)

    monkeypatch.setattr(sweep_mod, "run_stage", killed_in_big_seed0)
    with pytest.raises(Killed):
        run_sweep(sweep, generate_demo)
    cells = tmp_path / "work" / "cells"
    assert started == ["small/seed0", "small/seed1", "big/seed0"]
    assert (cells / "small/seed1" / CELL_FILE).is_file() and not (cells / "big/seed0" / CELL_FILE).exists()

    # the rerun skips the finished cells and starts the killed one again from a clean folder
    started.clear()
    monkeypatch.setattr(sweep_mod, "run_stage", lambda cfg: (started.append(cfg.train.output_dir),
                                                              real_run_stage(cfg))[1])
    results = run_sweep(sweep, generate_demo)
    assert [Path(p).parent.name for p in started] == ["seed0", "seed1"]
    assert all("/big/" in p for p in started)
    assert "killed" not in (cells / "big/seed0/stage2_2_fsq/log.jsonl").read_text()  # the new run's log only
    assert not results["missing"]

    # aggregation: mean and sample std over the seeds, from the cells' own files
    for variant in ("small", "big"):
        rows = [json.loads((cells / variant / f"seed{s}" / CELL_FILE).read_text())["metrics"] for s in (0, 1)]
        assert set(rows[0]) >= {"probe_mean", "probe_colour", "psnr", "ssim", "codebook_usage", "perplexity",
                                "code_stability", "seconds_total", "seconds_stage2_2_fsq"}
        for metric in ("probe_mean", "perplexity", "psnr"):
            values = [r[metric] for r in rows]
            agg = results["aggregate"][variant][metric]
            assert agg["mean"] == pytest.approx(sum(values) / 2)
            assert agg["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
            assert agg["std"] == pytest.approx(statistics.stdev(values))
    # a 16-code book is used far more fully than a 1000-code one by the same few images
    usage = {v: results["aggregate"][v]["codebook_usage"]["mean"] for v in ("small", "big")}
    assert usage["small"] > usage["big"]

    report = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| small |", "| big |"))]
    table, times = rows[:2], rows[2:]  # the metrics, then the wall time per stage
    assert len(table) == 2 and all(line.count(" ± ") >= 10 for line in table)
    seconds = results["aggregate"]["big"]["seconds_stage2_2_fsq"]
    assert times[1] == f"| big | {seconds['mean']:.1f} ± {seconds['std']:.1f} |"
    small = results["aggregate"]["small"]["perplexity"]
    assert f"{small['mean']:.3f} ± {small['std']:.3f}" in table[0]
    assert "| variant | paper | probe_mean |" in report and "The paper (its ablation score): big 2 > small 1." in report
    assert (tmp_path / "report" / "sweep.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["aggregate"] == results["aggregate"] and len(saved["cells"]) == 4

    # a third run finds every cell finished and trains nothing
    started.clear()
    run_sweep(sweep, generate_demo)
    assert started == []


@pytest.mark.slow
def test_vqa_metric_trains_the_mllm_on_the_cells_tokenizer(tmp_path):
    sweep_file = tmp_path / "vqa.yaml"
    sweep_file.write_text(yaml.safe_dump({
        **SWEEP, "mllm": "debug/sft_full", "variants": [{"name": "a"}], "seeds": [0], "metrics": ["vqa", "seconds"],
        "demo": {"n_train": 60, "n_val": 2, "n_test": 12}, "work_dir": str(tmp_path / "work"),
        "report_dir": str(tmp_path / "report")}))
    results = run_sweep(load_sweep(sweep_file), generate_demo)
    cell = results["cells"][0]
    assert 0.0 <= cell["metrics"]["vqa_accuracy"] <= 1.0
    assert set(cell["stage_seconds"]) == {"stage2_2_fsq", "mllm"}
    assert set(cell["vqa_per_type"]) >= {"colour", "shape", "count", "position", "word"}
    recipe = yaml.safe_load((tmp_path / "work/cells/a/seed0/mllm/mllm_config.yaml").read_text())
    assert recipe["model"]["tokenizer"] == str(tmp_path / "work/cells/a/seed0/stage2_2_fsq/viq_tokenizer")
    assert recipe["train"]["max_steps"] == 2  # the sweep-wide override reached the MLLM recipe too
