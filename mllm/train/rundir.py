"""One run per output folder: a lock held while a run writes, and a fresh run refused where another run's
files are (or, with ``train.overwrite_output_dir=true``, those files removed first).

The lock is ``output_dir/train.lock``, created with O_EXCL (atomic, also on NFS v3+), holding the holder's
pid and host. While the run lives, a daemon thread refreshes the file's mtime every ``HEARTBEAT_S``; the run
removes the lock when it ends, also on an error. A kill leaves it behind, no longer refreshed. The next run
takes over a lock whose holder is gone: at once when its pid is dead on this host, otherwise once the lock
has not been refreshed for ``STALE_S`` (a job that a scheduler killed on one node and requeued on another),
waiting at most that long. A lock that keeps being refreshed belongs to a live run: refused, naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import torch

from mllm.config import RecipeConfig
from mllm.model.layout import LLM_DIR, MLLM_CONFIG, VIQ_DIR, VISUAL_WEIGHTS
from mllm.train.ckpt_io import RUN_MARKER, STAGING_PREFIX, checkpoints
from viq.configio import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
HEARTBEAT_S = 20.0  # how often a live run refreshes its lock's mtime
STALE_S = 90.0  # a lock not refreshed for this long is a dead run's
LOG_FILE = "log.jsonl"
# what a run writes into its output_dir besides checkpoint-N/ and staging folders: stage_report.json is
# mllm.stages.report.REPORT_FILE (a layer above), data_summary.json mllm.data.dataset.DATA_SUMMARY, wandb/
# and runs/ the wandb and tensorboard folders (tests/mllm/train/test_fault_injection.py checks the names)
RUN_FILES = (LOG_FILE, MLLM_CONFIG, VISUAL_WEIGHTS, LLM_DIR, VIQ_DIR, RUN_MARKER, "stage_report.json",
             "data_summary.json", "wandb", "runs")


class RunLock:
    """A held ``train.lock``: refreshed by a daemon thread until ``release``."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._refresh, name="viq-run-lock", daemon=True)
        self._beat.start()

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed or taken over: nothing left to keep alive
                return

    def release(self) -> None:
        """Remove the lock if it is still this one (not one taken over after this process was presumed dead)."""
        self._stop.set()
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


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _holder_gone(path: Path, held: dict) -> str | None:
    """Why the lock's holder is gone, or None while it may be alive. A live holder on another host is only
    known by its heartbeat: wait (bounded by STALE_S) for the lock to go stale or to be refreshed."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        return None if _pid_alive(held["pid"]) else "no longer running on this host"
    deadline = time.monotonic() + STALE_S + HEARTBEAT_S
    while _age(path) <= STALE_S:
        if time.monotonic() > deadline:
            return None
        time.sleep(min(HEARTBEAT_S, 1.0))
    return f"its lock was not refreshed for {_age(path):.0f} s"


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
            gone = _holder_gone(path, held)
            if gone is None:
                who = (f"pid {held.get('pid')} on host {held.get('host')} since {held.get('since')}" if held
                       else "a holder it does not name (unreadable)")
                raise ConfigError(
                    f"train.output_dir={str(out)!r} is in use by another training run: {path} is held by {who}, "
                    f"refreshed {_age(path):.0f} s ago. Wait for that run, or choose another train.output_dir"
                ) from None
            log.warning("taking over %s: its holder, pid %s on %s, is gone (%s)", path, held.get("pid"),
                        held.get("host"), gone)
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
