"""`viq demo` at CI size: every step runs and every report file is written (a smoke test), plus real
checks on what the report says."""

import json
from pathlib import Path

import pytest

from mllm.cli import main
from mllm.demo.run import WORK_MARKER, DemoConfig, fresh_work_dir
from viq.configio import load_config

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "demo"


@pytest.mark.parametrize("name", ["default.yaml", "ci.yaml"])
def test_demo_settings_parse(name):
    cfg = load_config(DemoConfig, RECIPES / name)
    assert cfg.n_test > 0 and len(cfg.tokenizer_recipes) == 4


def test_work_dir_of_something_else_is_never_wiped(tmp_path):
    foreign = tmp_path / "checkout"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and no viq demo made it"):
        fresh_work_dir(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    # an earlier demo's directory is emptied and marked again
    demo = tmp_path / "demo"
    fresh_work_dir(demo)
    (demo / "stale.bin").write_bytes(b"x")
    fresh_work_dir(demo)
    assert sorted(p.name for p in demo.iterdir()) == [WORK_MARKER]


@pytest.mark.smoke
@pytest.mark.slow
def test_demo_writes_the_whole_report(tmp_path):
    report = tmp_path / "report"
    assert main(["demo", str(RECIPES / "ci.yaml"), f"work_dir={tmp_path / 'work'}", f"report_dir={report}"]) == 0
    for name in ("report.md", "results.json", "loss_curves.png", "reconstructions.png", "speedup.png"):
        assert (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    # both MLLMs were evaluated on the same test questions, and every pipeline step was timed
    assert results["eval_codes"]["n"] == results["eval_continuous"]["n"] == 16
    assert set(results["step_seconds"]) == {"generate data", "train tokenizer", "extract codes",
                                            "train MLLM from codes", "train continuous baseline", "evaluate",
                                            "benchmark", "report"}
    assert results["extract"]["counts"]["images"] == 120
    md = (report / "report.md").read_text()
    assert "VQA accuracy" in md and "saving vs continuous" in md
