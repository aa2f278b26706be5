"""`viq demo`'s settings and work folder. The demo itself at CI size (every step runs, every report file is
written, with checks on what the report says) runs once, from the installed wheel in an empty folder:
tests/mllm/test_packaging.py."""

from pathlib import Path

import pytest

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
