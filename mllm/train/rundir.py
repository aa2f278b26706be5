"""One run per output folder: a lock held while a run writes, and a fresh run refused where another run's
files are (or, with ``train.overwrite_output_dir=true``, those files removed first).

The lock is ``output_dir/train.lock``, created with O_EXCL (atomic, also on NFS v3+), holding the holder's
pid and host; the run removes it when it ends, also on an error. A kill leaves it behind. The next run
takes over a lock whose pid is no longer alive on this host, and says so. A lock from another host is not
taken over: no process here can tell whether that job still runs (a scheduler that requeues a killed job
onto another node leaves one). The error names its pid and host; delete the file once that job is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from mllm.config import RecipeConfig
from mllm.model.layout import LLM_DIR, MLLM_CONFIG, VIQ_DIR, VISUAL_WEIGHTS
from mllm.train.ckpt_io import RUN_MARKER, STAGING_PREFIX, checkpoints
from viq.configio import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
LOG_FILE = "log.jsonl"
# what a run writes into its output_dir besides checkpoint-N/ and staging folders: stage_report.json is
# mllm.stages.report.REPORT_FILE (a layer above), data_summary.json mllm.data.dataset.DATA_SUMMARY, wandb/
# and runs/ the wandb and tensorboard folders (tests/mllm/train/test_fault_injection.py checks the names)
RUN_FILES = (LOG_FILE, MLLM_CONFIG, VISUAL_WEIGHTS, LLM_DIR, VIQ_DIR, RUN_MARKER, "stage_report.json",
             "data_summary.json", "wandb", "runs")


@dataclass
class RunLock:
    path: Path
    token: str

    def release(self) -> None:
        """Remove the lock if it is still this one (not one taken over after this process was presumed dead)."""
        if _read_lock(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict:
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return held if isinstance(held, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(held: dict) -> bool:
    return (held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int)
            and not _pid_alive(held["pid"]))


def acquire_lock(out: Path) -> RunLock:
    """Take ``out/train.lock`` (see the module doc), or raise ConfigError naming its holder."""
    path = Path(out) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            if not _stale(held):
                who = (f"pid {held.get('pid')} on host {held.get('host')} since {held.get('since')}" if held
                       else "a holder it does not name (unreadable)")
                raise ConfigError(
                    f"train.output_dir={str(out)!r} is in use by another training run: {path} is held by {who}. "
                    "Wait for that run, or choose another train.output_dir; if that run is no longer alive "
                    f"(killed on another node), delete {path}") from None
            log.warning("taking over %s: its holder, pid %s on this host (%s), is no longer running",
                        path, held["pid"], held["host"])
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return RunLock(path, me["token"])
    raise ConfigError(f"{path}: another process took the lock while this one took over a stale one")


def run_entries(out: Path) -> list[str]:
    """The names in ``out`` that a run wrote (checkpoints, staging folders, logs, outputs); sorted."""
    out = Path(out)
    if not out.is_dir():
        return []
    ckpts = {p.name for _, p in checkpoints(out)}
    return sorted(p.name for p in out.iterdir()
                  if p.name in RUN_FILES or p.name in ckpts or p.name.startswith(STAGING_PREFIX))


def overwrite_output_dir(cfg: RecipeConfig) -> None:
    """``train.overwrite_output_dir=true``: remove what a run wrote into output_dir (other files stay)."""
    t = cfg.train
    if t.resume or t.resume_from_checkpoint:
        raise ConfigError("train.overwrite_output_dir=true deletes the runs in train.output_dir, train.resume / "
                          "train.resume_from_checkpoint continue one: set only one of them")
    out = Path(t.output_dir)
    for name in run_entries(out):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        log.warning("train.overwrite_output_dir=true: removed %s", path)


def check_output_dir(cfg: RecipeConfig) -> None:
    """Refuse a fresh run into a folder that holds another run (ConfigError), or clear it when told to."""
    t = cfg.train
    out = Path(t.output_dir)
    if t.overwrite_output_dir:
        overwrite_output_dir(cfg)
        return
    found = run_entries(out)
    if not found or t.resume:
        return
    ckpt = t.resume_from_checkpoint
    if ckpt and Path(ckpt).resolve().parent == out.resolve():
        return
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    start = (f"resumes from {ckpt!r}, which lies outside it" if ckpt else "starts fresh (train.resume=false)")
    raise ConfigError(
        f"train.output_dir={str(out)!r} holds another run ({shown}), and this run {start}: the two would mix. "
        "Continue that run with train.resume=true, choose a new train.output_dir, or set "
        "train.overwrite_output_dir=true to delete these first")


def claim_output_dir(cfg: RecipeConfig, args) -> RunLock | None:
    """On the main process (``args``: the run's TrainingArguments): take the lock, then check_output_dir.
    Every rank raises the main process's error, so that none waits for a run that will not start."""
    lock, error = None, None
    if args.should_save:
        out = Path(cfg.train.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = acquire_lock(out)
            check_output_dir(cfg)
        except (ValueError, OSError) as err:
            if lock is not None:
                lock.release()
                lock = None
            error = err
    dist = torch.distributed
    if args.world_size > 1 and dist.is_available() and dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error
    return lock
