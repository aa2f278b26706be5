"""The one-rank reference of the multi-rank tests and a two-rank ZeRO-3 run, each trained once per session and shared
by the test modules. The ZeRO-3 run goes through the `deepspeed` launcher: the one run is both the launcher's test
(tests/mllm/train/test_launchers.py) and the checkpoint the ZeRO-3 tests resume from (a launch of its own for
the launcher cost about 20 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mllm_helpers import RECIPES, debug_overrides
from multirank import SCHEDULE, ZERO3, deepspeed_two_ranks, ok

from mllm.cli import main


@pytest.fixture(scope="session")
def one_rank(demo_data, tmp_path_factory) -> Path:
    """sft_full on one rank at the two-rank runs' global batch (two packs per step)."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    assert main(["train", str(RECIPES / "debug" / "sft_full.yaml"),
                 *debug_overrides(demo_data, out, *SCHEDULE, "train.per_device_batch_size=2")]) == 0
    return out


@pytest.fixture(scope="session")
def zero3_two_ranks(demo_data, tmp_path_factory) -> Path:
    """sft_full on two ranks under ZeRO-3 (the `deepspeed` launcher, gloo), checkpoints at steps 2 and 4; read it,
    never write."""
    out = tmp_path_factory.mktemp("zero3_two_ranks") / "run"
    ok(deepspeed_two_ranks(RECIPES / "debug" / "sft_full.yaml",
                           debug_overrides(demo_data, out, *SCHEDULE, f"train.deepspeed={ZERO3}")))
    return out
