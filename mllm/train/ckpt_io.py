"""Checkpoints that are complete or absent, shared by the Trainer path (mllm.train.trainer.MLLMTrainer) and
the decoder stage (mllm.stages.decoder).

A save writes ``output_dir/.tmp-checkpoint-N/checkpoint-N/`` (every rank's files, under DeepSpeed), then
the main process writes ``checkpoint_complete.json`` into it, listing every file with its size, and renames
the folder to ``output_dir/checkpoint-N``. A kill at any point leaves either no ``checkpoint-N`` or a
complete one; the staging folder it leaves behind is reported on resume and replaced when step N is saved
again. A checkpoint is complete iff its marker exists and every file it lists is on disk with that size
(files added later are ignored). Sizes, not checksums: a kill cuts files short, and hashing every shard of
a large checkpoint would cost a second read of it.

Rotation (``train.save_total_limit``) runs after the rename and counts complete checkpoints only, so the
newest complete one is never removed before its successor is complete; incomplete ones are never removed.

``save_hook`` lets a test stop a save at one of ``SAVE_POINTS`` (raise from it to simulate a kill).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

log = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
RUN_MARKER = "run_complete.json"  # the final outputs of a finished run, listed the same way
STAGING_PREFIX = ".tmp-"
SAVE_POINTS = ("weights", "optimizer", "rng", "trainer_state", "before_rename")

# called as save_hook(point, folder) at each of SAVE_POINTS; None outside tests
save_hook: Callable[[str, Path], None] | None = None

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def fire(point: str, folder: Path) -> None:
    if save_hook is not None:
        save_hook(point, folder)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def staging_root(out: Path, step: int) -> Path:
    """The folder a save of ``step`` writes into; the checkpoint itself is its ``checkpoint-N`` child."""
    return Path(out) / f"{STAGING_PREFIX}{checkpoint_name(step)}"


def begin_save(out: Path, step: int) -> Path:
    """A fresh, empty staging ``checkpoint-N`` folder for ``step`` (a leftover of an interrupted save of the
    same step is replaced, with a warning)."""
    root = staging_root(out, step)
    if root.exists():
        log.warning("replacing %s, left by an earlier save of step %d that did not finish", root, step)
        shutil.rmtree(root)
    inner = root / checkpoint_name(step)
    inner.mkdir(parents=True)
    return inner


def list_files(root: Path, entries: Iterable[str] | None = None) -> dict[str, int]:
    """Relative path -> size of every file under ``root`` (or under its ``entries`` only), markers excepted."""
    tops = [root / e for e in entries] if entries is not None else [root]
    files: dict[str, int] = {}
    for top in tops:
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            if path.name not in (MARKER, RUN_MARKER):
                files[path.relative_to(root).as_posix()] = path.stat().st_size
    return files


def write_marker(root: Path, step: int, name: str = MARKER, entries: Iterable[str] | None = None) -> None:
    """Write ``name`` into ``root``, listing its files (or ``entries``' files) and their sizes; written
    aside and renamed, so a marker is never half-written."""
    body = {"format": 1, "step": step, "files": list_files(root, entries)}
    tmp = root / f".{name}.tmp"
    with tmp.open("w") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / name)


def verify(root: Path, name: str = MARKER) -> str | None:
    """None when ``root`` is complete (see the module doc); otherwise why not, in words."""
    path = Path(root) / name
    if not path.is_file():
        return f"no {name} (a save that did not finish, or one from before completion markers)"
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{name} is unreadable ({err})"
    for rel, size in files.items():
        file = Path(root) / rel
        if not file.is_file():
            return f"{rel} is missing ({name} lists it)"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {name} lists {size}"
    return None


def commit(staging: Path, final: Path, step: int) -> Path:
    """Mark ``staging`` complete and rename it to ``final`` (a folder there already, e.g. one skipped on
    resume, is replaced with a warning); returns ``final``. Main process only, after every rank wrote."""
    write_marker(staging, step)
    fire("before_rename", staging)
    aside = None
    if final.exists():
        reason = verify(final) or "complete; an earlier try of this step"
        log.warning("replacing %s (%s) with the one just saved", final, reason)
        aside = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside)
    shutil.rmtree(staging.parent, ignore_errors=True)  # the emptied staging root
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` folder in ``out``, oldest step first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def newest_complete(out: Path, check: Callable[[Path], str | None] | None = None) -> Path | None:
    """The newest complete checkpoint in ``out`` (``check``: an extra test, returning why a folder does not
    fit). Logs the one taken, why each newer one was skipped, and staging folders left by interrupted saves;
    deletes nothing."""
    for leftover in sorted(Path(out).glob(f"{STAGING_PREFIX}*")) if Path(out).is_dir() else []:
        if leftover.is_dir():
            log.warning("resume: skipping %s, left by a save that did not finish (kept; a save of the same "
                        "step replaces it)", leftover)
    for step, path in reversed(checkpoints(out)):
        reason = verify(path) or (check(path) if check is not None else None)
        if reason is None:
            log.info("resume: taking %s, the newest complete checkpoint (step %d)", path, step)
            return path
        log.warning("resume: skipping %s: %s (kept, not deleted)", path, reason)
    return None


def rotate(out: Path, limit: int | None, keep: Path, protect: Iterable[str | Path] = ()) -> None:
    """Remove the oldest complete checkpoints beyond ``limit``; never ``keep`` (the one just committed) nor
    ``protect``, nor any incomplete folder."""
    if limit is None or limit <= 0:
        return
    kept = {Path(keep).resolve(), *(Path(p).resolve() for p in protect if p)}
    complete = [path for _, path in checkpoints(out) if verify(path) is None]
    excess = len(complete) - limit
    for path in complete:
        if excess <= 0:
            break
        if path.resolve() in kept:
            continue
        shutil.rmtree(path)
        log.info("removed %s (train.save_total_limit=%d)", path, limit)
        excess -= 1


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log after ``step`` (and lines cut short by a kill): a resumed run trains
    those steps again and logs them anew."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    log.info("%s: dropped %d lines after step %d, which the resumed run trains again", path,
             len(lines) - len(kept), step)
