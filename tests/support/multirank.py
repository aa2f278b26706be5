"""Helpers of the multi-rank training tests: launching two CPU ranks, and comparing their runs with one rank's.

two_ranks starts the two rank processes itself, with the variables a launcher gives its workers (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what the `deepspeed` launcher's launch.py
sets too), not through torchrun: torchrun's own process (torch imported, a rendezvous, its shutdown) cost
4-9 s of every run on two cores (measured: the ZeRO tests 363 s -> 300 s, one four-step run 22-25 s -> 15 s). The
launchers users type have their own tests (tests/mllm/train/test_launchers.py: the `deepspeed` launcher and
two-node torchrun; tests/mllm/test_real_llm.py: `torchrun --standalone`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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
    """``viq train`` (or ``script``) on two local ranks; as under torchrun, a rank that fails ends the other. The
    result holds both ranks' output (rank 0's first) and the first failing rank's exit status."""
    target = [str(script)] if script is not None else ["-m", "mllm.cli"]
    cmd = [sys.executable, "-u", *target, "train", str(recipe), *overrides]
    world = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        try:
            for rank in range(2):
                # into files, not pipes: a pipe nobody reads while waiting on the other rank could fill and stall it
                with open(f"{logs}/{rank}.out", "w") as out, open(f"{logs}/{rank}.err", "w") as err:
                    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env={
                        **rank_env(), **world, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
            codes = _wait_all(procs, timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = {kind: "".join(Path(f"{logs}/{rank}.{kind}").read_text() for rank in range(2))
                for kind in ("out", "err")}
    return subprocess.CompletedProcess(cmd, next((c for c in codes if c != 0), 0), text["out"], text["err"])


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while running := [p for p in procs if p.poll() is None]:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(procs[0].args, timeout)
        if any(p.returncode != 0 for p in procs if p not in running):  # the other rank would wait for it forever
            for proc in running:
                proc.terminate()
        time.sleep(0.1)
    return [p.returncode for p in procs]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_two_ranks(recipe: Path, overrides: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """Two local ranks through the `deepspeed` launcher, in the command form of the README."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher is not None, "deepspeed is installed without its console script"
    # --master_port: the default 29500 may be taken by another job on this machine
    return run_bounded([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mllm.cli",
                        "train", str(recipe), *overrides], timeout)


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
