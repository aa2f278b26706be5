"""Helpers of the multi-rank training tests: launching two CPU ranks, and comparing their runs with one rank's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mllm_helpers import RECIPES, REPO
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mllm.cli import main
from mllm.model.layout import LLM_DIR
from mllm.train.checkpoint import load_exported

STEPS = 4
SCHEDULE = (f"train.max_steps={STEPS}", "train.save_steps=2", "train.logging_steps=1")
ZERO1, ZERO2, ZERO3 = (RECIPES / "deepspeed" / f"zero{stage}.json" for stage in (1, 2, 3))
ZERO3_OFFLOAD = RECIPES / "deepspeed" / "zero3_offload.json"
WEIGHTS = ("visual.safetensors", "llm/model.safetensors")  # sft_full: the whole LLM is saved
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank_env() -> dict[str, str]:
    """The test process's environment without any launcher variables, one thread per rank: two ranks share
    the two cores (DeepSpeed builds its CPU op on first use)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1"}


def run_bounded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=rank_env())


def two_ranks(recipe: Path, overrides: list[str], script: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    target = [str(script)] if script is not None else ["-m", "mllm.cli"]
    return run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *target, "train", str(recipe), *overrides], timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def assert_losses_match(got: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-4), (step, got, reference)


# the last bias of the softmax pool's scores adds the same value to the four scores of a window, which the softmax
# cancels: its gradient is zero but for rounding, which Adam scales up to steps of the learning rate's size, so
# where it ends depends on the order of floating-point sums (measured: 2e-5 apart after four steps, two ranks
# against one, with pixel input)
GRADIENT_FREE = ("projector.pool.score.2.bias",)


def assert_same_weights(a: Path, b: Path, names=WEIGHTS, atol: float = 1e-5) -> None:
    """Same tensors, whole (not one rank's partition), equal within ``atol`` (but for GRADIENT_FREE)."""
    for name in names:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys(), (name, sorted(set(wa) ^ set(wb))[:8])
        for key in set(wa) - set(GRADIENT_FREE):
            assert wa[key].shape == wb[key].shape, (name, key, wa[key].shape, wb[key].shape)
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=f"{name}: {key}")


def assert_exports_as_one_rank(checkpoint: Path, one_rank_checkpoint: Path, out: Path) -> None:
    """`viq export` of a multi-rank checkpoint: a plain transformers LLM with one rank's logits (1e-4)."""
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out / LLM_DIR).eval()
    reference = AutoModelForCausalLM.from_pretrained(one_rank_checkpoint / LLM_DIR).eval()
    ids = torch.arange(5, 60)[None]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0)
    assert load_exported(out).model is not None
