"""Fault injection on the Trainer path (issue 13): a save killed at each point of mllm.train.ckpt_io's
SAVE_POINTS, then resumed, ends with the uninterrupted run's losses and weights, bit for bit (CPU fp32,
seeded); a finished run restarted changes nothing; a fresh run into another run's folder is refused; a
checkpoint cut short under an intact marker is skipped; a second trainer into a folder in use is refused.

The kill is an exception raised from ckpt_io.save_hook: it leaves the folder as a SIGKILL at that point
would (the lock file aside, which the stale-lock test covers with a real dead process)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mllm_helpers import RECIPES, debug_overrides, read_log, step_losses

from mllm.cli import main
from mllm.data.dataset import DATA_SUMMARY
from mllm.stages.report import REPORT_FILE
from mllm.train import ckpt_io, rundir
from mllm.train.rundir import LOCK_FILE, RUN_FILES, acquire_lock
from viq.configio import ConfigError

BASE = ("train.max_steps=6", "train.save_steps=2", "train.logging_steps=1")
WEIGHTS = ("visual.safetensors", "llm/model.safetensors")  # sft_full: the whole LLM is saved


class Killed(Exception):
    pass


def train(demo, out: Path, *extra: str, recipe: str = "sft_full") -> int:
    return main(["train", str(RECIPES / "debug" / f"{recipe}.yaml"), *debug_overrides(demo, out, *BASE, *extra)])


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoints(out: Path) -> list[str]:
    return [p.name for _, p in ckpt_io.checkpoints(out)]


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_log(out) if "loss" in r]


def kill_at(point: str, step: int):
    def hook(at: str, folder: Path) -> None:
        if at == point and folder.name == f"checkpoint-{step}":
            raise Killed(f"{point} of checkpoint-{step}")
    return hook


@pytest.fixture
def messages():
    """The messages of the mllm loggers (mllm.cli.setup_logging stops them propagating to caplog)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, logger = Keep(), logging.getLogger("mllm")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> Path:
    """The uninterrupted run: 6 steps, checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(demo_data, out) == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6], "every step logged once"
    assert step_losses(out) == step_losses(reference)  # exact
    for name in WEIGHTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("point", ckpt_io.SAVE_POINTS)
def test_a_kill_inside_a_save_resumes_from_the_previous_checkpoint(point, reference, demo_data, tmp_path,
                                                                    monkeypatch, messages):
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt_io, "save_hook", kill_at(point, 4))
    with pytest.raises(Killed):
        train(demo_data, out)
    assert checkpoints(out) == ["checkpoint-2"], "a killed save leaves no checkpoint-4"
    assert (out / ".tmp-checkpoint-4").is_dir()
    assert logged_steps(out) == [1, 2, 3, 4]

    monkeypatch.setattr(ckpt_io, "save_hook", None)
    assert train(demo_data, out, "train.resume=true") == 0
    assert any("skipping" in m and ".tmp-checkpoint-4" in m for m in messages), messages
    assert any("taking" in m and "checkpoint-2" in m for m in messages), messages
    assert_same_run(out, reference)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(ckpt_io.verify(out / name) is None for name in checkpoints(out))
    assert not list(out.glob(".tmp-*")), "the save of step 4 replaced the leftover"


def test_save_total_limit_keeps_the_last_complete_checkpoint(demo_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt_io, "save_hook", kill_at("before_rename", 4))
    with pytest.raises(Killed):
        train(demo_data, out, "train.save_total_limit=1")
    assert checkpoints(out) == ["checkpoint-2"]
    assert ckpt_io.verify(out / "checkpoint-2") is None
    (out / "checkpoint-1").mkdir()  # incomplete (no marker): never counted, never removed
    (out / "checkpoint-1" / "visual.safetensors").write_bytes(b"cut")
    monkeypatch.setattr(ckpt_io, "save_hook", None)
    assert train(demo_data, out, "train.save_total_limit=1", "train.resume=true") == 0
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-6"]


def test_resume_with_no_complete_checkpoint_is_refused(demo_data, tmp_path, capsys, messages):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "visual.safetensors").write_bytes(b"cut")
    with pytest.raises(SystemExit):
        train(demo_data, out, "train.resume=true")
    assert "train.resume=true, but no checkpoint in" in capsys.readouterr().err
    assert any("skipping" in m and "checkpoint-3: no checkpoint_complete.json" in m for m in messages), messages
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"], "nothing written, the lock released"


def test_restarting_a_finished_run_changes_nothing(reference, demo_data, tmp_path, messages):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert train(demo_data, out, "train.resume=true") == 0
    assert snapshot(out) == before
    assert any("finished at step 6 of 6" in m and "nothing to train" in m for m in messages), messages
    # killed during its final save: the outputs are copied again from checkpoint-6, nothing is trained
    (out / "visual.safetensors").write_bytes(b"cut")
    shutil.rmtree(out / "llm")
    assert train(demo_data, out, "train.resume=true") == 0
    assert snapshot(out) == before


def test_restarting_a_finished_epoch_run_changes_nothing(demo_data, tmp_path):
    out = tmp_path / "run"
    assert train(demo_data, out, "train.max_steps=-1", "train.num_epochs=1") == 0
    before = snapshot(out)
    assert train(demo_data, out, "train.max_steps=-1", "train.num_epochs=1", "train.resume=true") == 0
    assert snapshot(out) == before


def test_a_fresh_run_into_another_runs_folder_is_refused(reference, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("the user's own")
    before = snapshot(out)
    with pytest.raises(SystemExit):  # the CLI reports a ConfigError as a usage error
        train(demo_data, out)
    err = capsys.readouterr().err
    assert f"train.output_dir='{out}' holds another run (checkpoint-2, checkpoint-4" in err
    for option in ("train.resume=true", "new train.output_dir", "train.overwrite_output_dir=true"):
        assert option in err
    assert snapshot(out) == before
    with pytest.raises(SystemExit):
        train(demo_data, out, "train.overwrite_output_dir=true", "train.resume=true")
    assert "set only one of them" in capsys.readouterr().err
    assert snapshot(out) == before

    assert train(demo_data, out, "train.overwrite_output_dir=true") == 0
    assert_same_run(out, reference)
    assert (out / "notes.txt").read_text() == "the user's own"


def test_a_lora_run_into_a_full_runs_folder_is_refused(reference, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    with pytest.raises(SystemExit):
        train(demo_data, out, "train.max_steps=3", recipe="sft_lora")
    assert "holds another run" in capsys.readouterr().err
    assert snapshot(out) == before  # no adapter beside the full weights, no checkpoint overwritten


def test_a_checkpoint_cut_short_under_its_marker_is_skipped(reference, demo_data, tmp_path, messages):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    weights = out / "checkpoint-6" / "visual.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    assert ckpt_io.verify(out / "checkpoint-6") == (f"visual.safetensors has {size // 2} bytes, "
                                                     f"checkpoint_complete.json lists {size}")
    assert train(demo_data, out, "train.resume=true") == 0
    assert any("skipping" in m and "checkpoint-6" in m and f"lists {size}" in m for m in messages), messages
    assert any("taking" in m and "checkpoint-4" in m for m in messages), messages
    assert_same_run(out, reference)
    assert weights.read_bytes() == (reference / "checkpoint-6" / "visual.safetensors").read_bytes()


def test_a_second_trainer_into_a_folder_in_use_is_refused(demo_data, tmp_path, capsys, messages, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    # a live process holds the lock: a trainer running there
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "token": "t", "since": "x"}))
    try:
        with pytest.raises(SystemExit):
            train(demo_data, out)
        err = capsys.readouterr().err
        assert f"is in use by another training run: {lock} is held by pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.communicate(b"")  # the holder ends: its lock is stale now
    assert train(demo_data, out) == 0
    assert any("taking over" in m and f"pid {holder.pid}" in m for m in messages), messages
    assert not lock.exists(), "a run removes its lock when it ends"
    # a lock from another host is known alive only by its heartbeat: one that is not refreshed is a killed
    # job's (requeued here by a scheduler) and is taken over once stale; one that is refreshed is refused
    monkeypatch.setattr(rundir, "STALE_S", 0.6)
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.1)
    lock.write_text(json.dumps({"pid": holder.pid, "host": "another-node", "token": "t", "since": "x"}))
    taken = acquire_lock(out)
    assert any("taking over" in m and "another-node" in m and "not refreshed" in m for m in messages), messages
    taken.release()
    lock.write_text(json.dumps({"pid": holder.pid, "host": "another-node", "token": "t", "since": "x"}))
    stop = threading.Event()

    def refresh():  # the live run's heartbeat
        while not stop.wait(0.1):
            os.utime(lock)

    beat = threading.Thread(target=refresh)
    beat.start()
    try:
        with pytest.raises(ConfigError, match=f"held by pid {holder.pid} on host another-node"):
            acquire_lock(out)
    finally:
        stop.set()
        beat.join()
    # the same process's own lock: released only by the one that holds it
    lock.unlink()
    mine = acquire_lock(out)
    with pytest.raises(ConfigError, match="in use by another training run"):
        acquire_lock(out)
    mine.release()
    assert not lock.exists()


def test_the_run_files_name_what_runs_write():
    # rundir cannot import these (they live in layers above or beside it); a renamed file must be renamed there
    assert REPORT_FILE in RUN_FILES and DATA_SUMMARY in RUN_FILES
