"""The one-rank reference of the multi-rank tests, trained once per session and shared by their modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from mllm_helpers import RECIPES, debug_overrides
from multirank import SCHEDULE

from mllm.cli import main


@pytest.fixture(scope="session")
def one_rank(demo_data, tmp_path_factory) -> Path:
    """sft_full on one rank at the two-rank runs' global batch (two packs per step)."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    assert main(["train", str(RECIPES / "debug" / "sft_full.yaml"),
                 *debug_overrides(demo_data, out, *SCHEDULE, "train.per_device_batch_size=2")]) == 0
    return out
