"""Two CPU ranks under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (gloo) train the debug recipes with the same
losses as one rank at the same global batch, save one rank's weights, resume and export.

Why the losses agree to ~1e-6: both runs see the same packs in the same order (rank r of step s gets
the pack that one rank puts at position r of its two-pack row), the loss is the token-weighted mean
over the whole global batch in both (the Trainer passes num_items_in_batch, gathered across ranks),
packing is exact, and the random-weight LLM starts from the same weights under every stage (built whole,
then partitioned: mllm.train.zero.random_llm_outside_zero_init). Only the order of floating-point sums
differs (two rows reduced across ranks vs one row), which moved the fp32 losses by ~1e-6 (relative 1e-7)
over four steps when measured; 1e-4 relative leaves room for that, while another pack order or a mean of
per-rank means instead of the token-weighted mean would change the loss by far more (different packs'
losses differ by ~0.1). The weights after four steps differed by at most 3e-6 (ZeRO-3 against one rank).

The multi-rank runs take about 10-15 s each on two cores; the one-rank reference (tests/mllm/train/conftest.py)
is shared with the other multi-rank test modules.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mllm_helpers import RECIPES, REPO, debug_overrides, step_losses
from multirank import (
    LAUNCHER_VARS,
    SCHEDULE,
    STEPS,
    ZERO1,
    ZERO2,
    ZERO3,
    assert_exports_as_one_rank,
    assert_losses_match,
    assert_same_weights,
    ok,
    two_ranks,
)

from mllm.cli import main
from mllm.model.layout import VIQ_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]


def assert_saves_resumes_and_exports_as_one_rank(run: Path, config: Path, one_rank: Path, demo_data,
                                                 tmp_path: Path) -> None:
    """A two-rank run under ``config``: one rank's losses and weights (each checkpoint and the final save hold
    whole weights), a resume from checkpoint-2 in fresh processes with the uninterrupted losses bit for bit, and
    `viq export` of its last checkpoint loading in plain transformers with one rank's logits."""
    losses = step_losses(run)
    assert_losses_match(losses, step_losses(one_rank))
    for step in (2, STEPS):
        assert_same_weights(run / f"checkpoint-{step}", one_rank / f"checkpoint-{step}")
    assert_same_weights(run, one_rank)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-2", resumed / "checkpoint-2")
    ok(two_ranks(RECIPES / "debug" / "sft_full.yaml", debug_overrides(
        demo_data, resumed, *SCHEDULE, f"train.deepspeed={config}", "train.resume=true")))
    again = step_losses(resumed)
    assert sorted(again) == [3, 4]
    assert all(again[s] == losses[s] for s in again), (again, losses)

    assert_exports_as_one_rank(run / f"checkpoint-{STEPS}", one_rank / f"checkpoint-{STEPS}", tmp_path / "export")


@pytest.mark.parametrize("config", [ZERO1, ZERO2], ids=["zero1", "zero2"])
def test_zero1_and_zero2_train_save_resume_and_export_as_one_rank(config, one_rank, demo_data, tmp_path):
    run = tmp_path / "two_ranks"
    ok(two_ranks(RECIPES / "debug" / "sft_full.yaml",
                 debug_overrides(demo_data, run, *SCHEDULE, f"train.deepspeed={config}")))
    # ZeRO partitioned the optimizer state over both ranks
    assert sorted(p.name for p in (run / f"checkpoint-{STEPS}" / f"global_step{STEPS}").glob(
        "zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert_saves_resumes_and_exports_as_one_rank(run, config, one_rank, demo_data, tmp_path)


def test_zero3_trains_saves_resumes_and_exports_as_one_rank(one_rank, zero3_two_ranks, demo_data, tmp_path):
    # before: a step-2 hang in DeepSpeed's fetch trace, and another initialisation under zero.Init
    assert_saves_resumes_and_exports_as_one_rank(zero3_two_ranks, ZERO3, one_rank, demo_data, tmp_path)


PROBE = '''
import json, os, sys
from mllm.cli import main
from mllm.model.mllm import MLLM

forward = MLLM.forward

def counting(self, *args, image_grids=None, **kwargs):
    with open(os.path.join(sys.argv[-1].split("=", 1)[1], "images_rank" + os.environ["RANK"] + ".jsonl"), "a") as fh:
        fh.write(json.dumps(0 if image_grids is None else len(image_grids)) + "\\n")
    return forward(self, *args, image_grids=image_grids, **kwargs)

MLLM.forward = counting
sys.exit(main(sys.argv[1:]))
'''


def test_zero3_with_text_only_batches_on_one_rank(demo_data, tmp_path):
    # every other sample without its image, unpacked, one sample per rank and step: some steps give one rank
    # a text-only batch and the other an image (the probe records it); ZeRO-3's fetch trace must still agree
    records = json.loads(Path(demo_data["train"]).read_text())
    for rec in records[1::2]:
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    data = Path(demo_data["train"]).parent / "mixed_text_only.json"
    data.write_text(json.dumps(records))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "run"
    out.mkdir()
    overrides = [f"data.train={data}", "data.demo=false", "data.packing=false", *SCHEDULE,
                 f"train.deepspeed={ZERO3}", f"train.output_dir={out}"]  # the probe reads the last one
    ok(two_ranks(RECIPES / "debug" / "sft_full.yaml", overrides, script=probe))
    per_rank = [[json.loads(x) for x in (out / f"images_rank{r}.jsonl").read_text().split()] for r in (0, 1)]
    assert any((a == 0) != (b == 0) for a, b in zip(*per_rank, strict=True)), per_rank
    assert sorted(step_losses(out)) == list(range(1, STEPS + 1))


def test_zero3_tokenizer_stage_saves_the_gathered_tokenizer(demo_data, tmp_path):
    stage1 = RECIPES / "tokenizer" / "debug" / "stage1.yaml"
    runs = {}
    for name, config in (("zero2", ZERO2), ("zero3", ZERO3)):
        runs[name] = tmp_path / name
        ok(two_ranks(stage1, debug_overrides(demo_data, runs[name], *SCHEDULE, f"train.deepspeed={config}")))
    assert_losses_match(step_losses(runs["zero3"]), step_losses(runs["zero2"]))
    assert_same_weights(runs["zero3"], runs["zero2"], names=(f"{VIQ_DIR}/model.safetensors", "visual.safetensors"))


STALL = '''
import os, sys, time
from mllm.cli import main
from mllm.train import ckpt_io

def stall(point, folder):
    if point == "trainer_state" and os.environ["RANK"] == "1":
        time.sleep(3600)  # alive, but never at the barrier that follows: the collective cannot complete

ckpt_io.save_hook = stall
sys.exit(main(sys.argv[1:]))
'''


def test_a_stalled_rank_ends_the_run_within_ddp_timeout(demo_data, tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    start = time.monotonic()
    proc = two_ranks(RECIPES / "debug" / "sft_full.yaml",
                     debug_overrides(demo_data, tmp_path / "run", *SCHEDULE, "train.ddp_timeout=10",
                                     f"train.deepspeed={ZERO3}"), script=script, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "Timed out" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120, elapsed  # start-up, two steps, then 10 s at the barrier; the default would be 600 s


def test_a_deepspeed_recipe_runs_as_one_plain_process(demo_data, tmp_path):
    # no launcher: the CLI sets up the world of one that a launcher would (before: "No module named 'mpi4py'")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    steps = ("train.max_steps=2", "train.logging_steps=1")
    ds = tmp_path / "deepspeed"
    proc = subprocess.run([sys.executable, "-m", "mllm.cli", "train", str(RECIPES / "debug" / "sft_full.yaml"),
                           *debug_overrides(demo_data, ds, *steps, f"train.deepspeed={ZERO3}")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    ok(proc)
    plain = tmp_path / "plain"
    assert main(["train", str(RECIPES / "debug" / "sft_full.yaml"), *debug_overrides(demo_data, plain, *steps)]) == 0
    got, reference = step_losses(ds), step_losses(plain)
    assert sorted(got) == sorted(reference) == [1, 2]
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-4), (step, got, reference)
