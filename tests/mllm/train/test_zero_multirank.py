"""Two CPU ranks under DeepSpeed ZeRO-2 (torchrun, gloo) train the debug recipe with the same losses as
one rank at the same global batch.

Why the losses agree to ~1e-6: both runs see the same packs in the same order (rank r of step s gets
the pack that one rank puts at position r of its two-pack row), the loss is the token-weighted mean
over the whole global batch in both (the Trainer passes num_items_in_batch, gathered across ranks),
and packing is exact. Only the order of floating-point sums differs (two rows reduced across ranks vs
one row), which moved the fp32 losses by ~1e-6 (relative 1e-7) over three steps when measured; 1e-4
relative leaves room for that, while another pack order or a mean of per-rank means instead of the
token-weighted mean would change the loss by far more (different packs' losses differ by ~0.1).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from mllm_helpers import RECIPES, REPO, debug_overrides, step_losses

from mllm.cli import main

STEPS = 3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero2_two_ranks_match_one_rank(demo_data, tmp_path):
    recipe = str(RECIPES / "debug" / "sft_full.yaml")
    two = tmp_path / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mllm.cli", "train", recipe,
           *debug_overrides(demo_data, two, f"train.max_steps={STEPS}",
                            f"train.deepspeed={RECIPES / 'deepspeed' / 'zero2.json'}")]
    # one thread per rank: two ranks share the two cores (DeepSpeed builds its CPU op on first use)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ckpt = two / f"checkpoint-{STEPS}"
    # ZeRO partitioned the optimizer state over both ranks
    assert sorted(p.name for p in (ckpt / f"global_step{STEPS}").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    one = tmp_path / "one_rank"
    assert main(["train", recipe, *debug_overrides(demo_data, one, f"train.max_steps={STEPS}",
                                                   "train.per_device_batch_size=2")]) == 0
    losses_two, losses_one = step_losses(two), step_losses(one)
    assert sorted(losses_two) == sorted(losses_one) == list(range(1, STEPS + 1))
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-4), (step, losses_two, losses_one)
