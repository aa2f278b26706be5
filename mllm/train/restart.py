"""Where a Trainer run starts and how it ends, so that a restart is safe: the checkpoint it resumes from
(the newest complete one), a log without the steps it trains again, nothing trained or written when the
run had finished, and the final outputs marked complete (``run_complete.json``) once they all are.
The trainer passed in is mllm.train.trainer.MLLMTrainer (not imported: that module imports this one).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState

from mllm.config import RecipeConfig
from mllm.model.layout import LLM_DIR, MLLM_CONFIG, VISUAL_WEIGHTS
from mllm.train import ckpt_io
from mllm.train.rundir import LOG_FILE
from viq.configio import ConfigError

log = logging.getLogger(__name__)

EXPORT_ENTRIES = (MLLM_CONFIG, VISUAL_WEIGHTS, LLM_DIR)  # mllm.train.checkpoint.save_checkpoint's layout


def resume_target(cfg: RecipeConfig) -> str | None:
    """train.resume_from_checkpoint (checked), else with train.resume the newest complete checkpoint in
    output_dir (ckpt_io.newest_complete says which and why), else None: a fresh start."""
    t = cfg.train
    if t.resume_from_checkpoint:
        ckpt = Path(t.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise ValueError(f"train.resume_from_checkpoint {t.resume_from_checkpoint!r} is not a directory")
        reason = ckpt_io.verify(ckpt)
        if reason is not None and (ckpt / ckpt_io.MARKER).is_file():
            raise ValueError(f"train.resume_from_checkpoint {t.resume_from_checkpoint!r} is not complete: {reason}")
        if reason is not None:
            log.warning("train.resume_from_checkpoint=%s: %s; taking it as named", ckpt, reason)
        return t.resume_from_checkpoint
    if not t.resume:
        return None
    out = Path(t.output_dir)
    last = ckpt_io.newest_complete(out)
    if last is not None:
        return str(last)
    found = [path.name for _, path in ckpt_io.checkpoints(out)]
    if found:
        # none verifies (cut short, or saved before completion markers): starting over would redo that work
        raise ConfigError(f"train.resume=true, but no checkpoint in {str(out)!r} is complete ({', '.join(found)}; "
                          "the log says why): name one with train.resume_from_checkpoint=DIR to take it as it "
                          "is, or start again with train.resume=false train.overwrite_output_dir=true")
    log.info("train.resume=true but %s holds no checkpoint: starting from scratch", out)
    return None


def checkpoint_step(ckpt: str | Path) -> int:
    path = Path(ckpt) / TRAINER_STATE_NAME
    return int(json.loads(path.read_text())["global_step"]) if path.is_file() else 0


def train_or_restore(trainer: Trainer, before_training: Callable[[], None] | None = None) -> str:
    """Train from ``trainer.resume_from`` (None: from scratch) and return "trained"; ``before_training`` runs
    just before (calibrations, which skip themselves on a resume).

    A resume from a checkpoint at the run's last step (train.max_steps, or its epochs) trains nothing:
    "finished" when the final outputs are complete (nothing is written), "restored" when they are not (a
    kill during the final save): the checkpoint's trainer state is loaded and its layout copied into
    output_dir; the caller writes what else it exports (from the checkpoint's weights), then calls
    mark_run_complete."""
    out, ckpt = Path(trainer.args.output_dir), trainer.resume_from
    done = checkpoint_step(ckpt) if ckpt else 0
    total = trainer.total_steps() if ckpt else None
    if ckpt and done >= total:
        reason = ckpt_io.verify(out, ckpt_io.RUN_MARKER)
        if reason is None:
            log.info("this run finished at step %d of %d (%s): nothing to train, nothing written", done, total, ckpt)
            return "finished"
        log.warning("this run finished at step %d of %d (%s), but its final outputs in %s are not complete (%s): "
                    "writing them again from that checkpoint", done, total, ckpt, out, reason)
        trainer.state = TrainerState.load_from_json(str(Path(ckpt) / TRAINER_STATE_NAME))
        if trainer.args.should_save:
            for name in EXPORT_ENTRIES:
                _replace(Path(ckpt) / name, out / name)
        return "restored"
    if trainer.args.should_save:
        (out / ckpt_io.RUN_MARKER).unlink(missing_ok=True)  # the final outputs change from here on
        ckpt_io.truncate_log(out / LOG_FILE, done)
    if before_training is not None:
        before_training()
    trainer.train(resume_from_checkpoint=ckpt)
    return "trained"


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.exists():
        shutil.copy2(src, dst)


def mark_run_complete(trainer: Trainer, extra: tuple[str, ...] = ()) -> None:
    """Record the final outputs in output_dir (the checkpoint layout, and ``extra`` entries) as complete:
    a restart of the finished run then writes nothing. Main process; call after the last output is written."""
    if not trainer.args.should_save:
        return
    out = Path(trainer.args.output_dir)
    entries = [name for name in (*EXPORT_ENTRIES, *extra) if (out / name).exists()]
    ckpt_io.write_marker(out, trainer.state.global_step, ckpt_io.RUN_MARKER, entries)
