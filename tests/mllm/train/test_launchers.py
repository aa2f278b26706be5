"""The launchers users type, on CPU ranks (gloo): the `deepspeed` launcher with two local processes, in the
command form of the README, and a two-node torchrun job on localhost (two launcher invocations, one process
each, a static rendezvous on 127.0.0.1). Both train sft_full under ZeRO-3 with the one-rank reference's losses
at the same global batch (tolerance: test_zero_multirank.py). The `deepspeed` launcher's run is the session's
ZeRO-3 run (the zero3_two_ranks fixture, tests/mllm/train/conftest.py), which the ZeRO-3 tests resume from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from mllm_helpers import RECIPES, REPO, debug_overrides, step_losses
from multirank import SCHEDULE, ZERO3, assert_losses_match, assert_same_weights, free_port, rank_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]

RECIPE = RECIPES / "debug" / "sft_full.yaml"
TIMEOUT = 400


def test_deepspeed_launcher_two_local_processes(one_rank, zero3_two_ranks):
    # launched by the fixture (multirank.deepspeed_two_ranks), which fails there if the launcher does
    assert_losses_match(step_losses(zero3_two_ranks), step_losses(one_rank))
    assert_same_weights(zero3_two_ranks, one_rank)


def test_two_nodes_on_localhost_match_one_rank(one_rank, demo_data, tmp_path):
    out, port = tmp_path / "run", free_port()

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "mllm.cli", "train", str(RECIPE),
               *debug_overrides(demo_data, out, *SCHEDULE, f"train.deepspeed={ZERO3}")]
        # into a file, not a pipe: a pipe nobody reads while waiting on the other node could fill and stall it
        with (tmp_path / f"node{rank}.log").open("w") as log:
            return subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=log, stderr=subprocess.STDOUT)

    nodes = [node(0), node(1)]
    try:
        for proc in nodes:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in nodes:  # a node left waiting for its peer: torchrun passes SIGTERM on to its worker
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for rank, proc in enumerate(nodes):
        assert proc.returncode == 0, (tmp_path / f"node{rank}.log").read_text()[-4000:]
    assert_losses_match(step_losses(out), step_losses(one_rank))
    assert_same_weights(out, one_rank)
