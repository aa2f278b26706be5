"""Training: a thin ``transformers.Trainer`` subclass and the recipe -> run wiring.

DeepSpeed ZeRO (``train.deepspeed``: a json with "auto" values the Trainer fills in) and peft are
wired here and in mllm.model.build only. What the subclass changes:
- the optimizer: AdamW over per-part parameter groups (mllm.train.optim.param_groups);
- the loss inputs: discrete runs turn pixels into codes with the frozen CodeEncoder when the batch
  brings no codes;
- saving and resuming: the checkpoint layout of mllm.train.checkpoint (adapters or full LLM, trainable
  visual weights, the recipe); under ZeRO-3 the Trainer gathers the state dict before ``_save``; each
  checkpoint-N is written aside and renamed once complete (mllm.train.ckpt_io), resume takes the newest
  complete one, and a run that had finished trains nothing (mllm.train.restart);
- logging: tokens/s, samples/s, peak memory and per-part learning rates, written by JsonlLogger.

Batches: with ``data.packing`` the data set yields packs and a device batch of k packs becomes ONE
padding-free row (collate_packed); otherwise samples are right-padded (collate_padded). Either way the
loss is the mean over the supervised tokens of the whole (accumulated, all-rank) batch, because the
Trainer passes ``num_items_in_batch`` down to the LLM's loss.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import resource
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from mllm.config import RecipeConfig, resolve_dtype, resolve_recipe, save_recipe
from mllm.data.dataset import write_data_summary
from mllm.data.descriptors import resolve_data
from mllm.data.phases import Phase, PhasedDataset, PhaseSampler
from mllm.model.build import BuiltModel, build_mllm
from mllm.model.layout import MLLM_CONFIG
from mllm.train import ckpt_io
from mllm.train.checkpoint import load_checkpoint_weights, save_checkpoint
from mllm.train.data_setup import build_datasets, items_per_step, plan_phases, resolve_image_settings
from mllm.train.optim import param_groups
from mllm.train.restart import mark_run_complete, resume_target, train_or_restore
from mllm.train.rundir import LOG_FILE, RunLock, claim_output_dir
from mllm.train.zero import (
    check_resume_world_size,
    check_zero_config,
    cpu_adamw,
    load_zero_config,
    loads_universal,
    offloads_optimizer,
    random_llm_outside_zero_init,
    repair_universal_load,
)
from viq.configio import to_dict

log = logging.getLogger(__name__)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class JsonlLogger(TrainerCallback):
    """Appends every log event as one JSON line to ``output_dir/log.jsonl`` (rank 0) and logs it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOG_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        log.info("step %d: %s", state.global_step,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))


class QuietProgress(ProgressCallback):
    """The progress bar without its printing of the log dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


class MLLMTrainer(Trainer):
    def __init__(self, *args, recipe: RecipeConfig, text_tokenizer, code_encoder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.text_tokenizer = text_tokenizer
        self.code_encoder = code_encoder.to(self.args.device) if code_encoder is not None else None
        self._tokens = 0
        self._samples = 0
        self._t_last: float | None = None
        self._group_lrs: dict[str, float] = {}
        self._group_hyper: list[dict] = []  # each optimizer group's hyperparameters but its learning rate, as built
        self._staging: Path | None = None  # the staging root of the checkpoint being saved
        self.resume_from: str | None = None  # set by prepare_trainer
        self.run_lock: RunLock | None = None  # held by the main process, from prepare_trainer
        if any(isinstance(cb, JsonlLogger) for cb in self.callback_handler.callbacks):
            # JsonlLogger prints every log line already; keep the bar, drop the second print
            self.callback_handler.remove_callback(PrinterCallback)
            if self.callback_handler.pop_callback(ProgressCallback) is not None:
                self.add_callback(QuietProgress)

    # optimizer: per-part learning rates, no decay on biases/norms/vectors
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            target = self.accelerator.unwrap_model(self.model if model is None else model)
            hyper = {"lr": self.recipe.train.learning_rate, "betas": tuple(self.recipe.train.adam_betas), "eps": 1e-8}
            adamw = cpu_adamw if offloads_optimizer(self.args) else torch.optim.AdamW
            self.optimizer = adamw(param_groups(target, self.recipe), **hyper)
            self._group_hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                                 for g in self.optimizer.param_groups]
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        data = self.train_dataset if train_dataset is None else train_dataset
        if not isinstance(data, PhasedDataset):
            return super()._get_train_sampler(train_dataset)
        return PhaseSampler(data, self.args.max_steps, items_per_step(self.args), self.args.seed)

    # inputs
    def _with_codes(self, inputs: dict) -> dict:
        if self.code_encoder is None or inputs.get("codes") is not None:
            return inputs
        inputs = dict(inputs)
        pixels = inputs.pop("pixel_values", None)
        if pixels:
            inputs["codes"] = self.code_encoder(pixels)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self._with_codes(inputs), return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._t_last is None:
            self._t_last = time.perf_counter()
        mask = inputs.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        cu = inputs.get("cu_seq_lens")
        self._samples += len(cu) - 1 if cu is not None else inputs["input_ids"].shape[0]
        # the scheduler steps before the log: record the learning rates this step actually uses
        self._group_lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups
                           if "name" in g and not g["name"].endswith("no_decay")}
        return super().training_step(model, inputs, num_items_in_batch)

    # logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "grad_norm" in logs:  # a training-step log: every rank is here
            counts = torch.tensor([self._tokens, self._samples], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            now = time.perf_counter()
            elapsed = max(now - (self._t_last or now), 1e-9)
            logs["tokens_per_s"] = float(counts[0]) / elapsed
            logs["samples_per_s"] = float(counts[1]) / elapsed
            logs["peak_mem_gib"] = peak_memory_gib(self.args.device)
            logs.update(self._group_lrs)
            # tokenizer stages (mllm.stages.llm_stage.TokenizerStageModel) add their loss terms and code metrics
            stage_metrics = getattr(self.accelerator.unwrap_model(self.model), "pop_metrics", None)
            if stage_metrics is not None:
                logs.update(stage_metrics())
            self._tokens = self._samples = 0
            self._t_last = now
        super().log(logs, start_time)

    # saving and loading (mllm.train.checkpoint layout, each checkpoint committed by mllm.train.ckpt_io)
    def _get_output_dir(self, trial) -> str:
        # during a checkpoint save the Trainer's run folder is the staging root (see _save_checkpoint)
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        # the Trainer writes checkpoint-N in place and rotates right away. Here every rank writes into a
        # staging root; once all have (a barrier, bounded by the process group's timeout, args.ddp_timeout)
        # the main process alone writes the marker, renames, and rotates.
        out, step = Path(self._get_output_dir(trial)), self.state.global_step
        if self.args.should_save:
            ckpt_io.begin_save(out, step)
        self.accelerator.wait_for_everyone()
        self._staging = ckpt_io.staging_root(out, step)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        staging = ckpt_io.staging_root(out, step) / ckpt_io.checkpoint_name(step)
        ckpt_io.fire("trainer_state", staging)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = ckpt_io.commit(staging, out / ckpt_io.checkpoint_name(step), step)
            ckpt_io.rotate(out, self.args.save_total_limit, keep=final)
            log.info("saved %s", final)
        self.accelerator.wait_for_everyone()  # no rank runs ahead of a checkpoint that may not exist yet

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        ckpt_io.fire("optimizer", Path(output_dir))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        ckpt_io.fire("rng", Path(output_dir))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        save_checkpoint(model, self.text_tokenizer, self.recipe, output_dir, state_dict=state_dict)
        if self._staging is not None:
            ckpt_io.fire("weights", Path(output_dir))
        else:
            log.info("saved %s", output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and loads_universal(self.args):
            repair_universal_load(self.optimizer, self._group_hyper, self.lr_scheduler.base_lrs,
                                          self.lr_scheduler.get_last_lr())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_checkpoint_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    # the run around train()
    def total_steps(self) -> int:
        """The optimizer steps of the whole run: train.max_steps, or its epochs counted as train() counts them."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    def release_output_dir(self) -> None:
        """Give up the output folder's lock (mllm.train.rundir); a no-op on other ranks and when released."""
        if self.run_lock is not None:
            self.run_lock.release()


def training_arguments(cfg: RecipeConfig, dtype: torch.dtype, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    report_to = [r for r in t.report_to if r != "jsonl"]
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("train.report_to lists tensorboard but it is not installed: pip install tensorboard")
    periodic_eval = has_eval and t.eval_steps is not None
    return TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the training steps
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=t.eval_steps if periodic_eval else None,
        prediction_loss_only=True,
        bf16=dtype == torch.bfloat16,
        deepspeed=str(resolve_recipe(t.deepspeed)) if t.deepspeed else None,  # a path, or one shipped in recipes/
        report_to=report_to or "none",
        dataloader_num_workers=t.dataloader_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # the model takes pixel_values/codes/image_grids
        label_names=["labels"],
        average_tokens_across_devices=True,
        disable_tqdm=not t.progress_bar,
        # without a GPU accelerate only sets up gloo ranks (torchrun, deepspeed on CPU) when told so;
        # otherwise every rank believes it is alone and trains on the full data
        use_cpu=not torch.cuda.is_available(),
        ddp_timeout=t.ddp_timeout,  # the process group's, which DeepSpeed's communication reuses
    )


def _init_distributed(args: TrainingArguments) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    # train.ddp_timeout bounds every collective. TrainingArguments hands it to the process group on GPU only:
    # with use_cpu (gloo) the group got torch's default of 30 minutes, so it is set here for both
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=args.ddp_timeout))
    # on CPU, accelerate starts torch.distributed itself (gloo) and leaves deepspeed.comm down; ZeRO-3's
    # zero.Init, which transformers uses while building the LLM, then sees a world of one. On GPU
    # accelerate has initialised deepspeed.comm already and this is a no-op.
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(),
                                   timeout=datetime.timedelta(seconds=args.ddp_timeout))


def _init_wandb(cfg: RecipeConfig, args: TrainingArguments) -> None:
    # start the run ourselves so that offline mode comes from the recipe, not the environment;
    # the Trainer's WandbCallback reuses an active run
    if "wandb" not in cfg.train.report_to or not args.should_log:
        return
    import wandb

    wandb.init(project=cfg.train.wandb_project, mode=cfg.train.wandb_mode, dir=cfg.train.output_dir,
               config=to_dict(cfg))


def _build_mllm(cfg: RecipeConfig, args: TrainingArguments) -> BuiltModel:
    return build_mllm(cfg)


def prepare_trainer(cfg: RecipeConfig, *, build=_build_mllm, phases: list[Phase] | None = None) -> MLLMTrainer:
    """Data, model and Trainer of a recipe, ready for ``train()``. ``build`` ((recipe, training arguments) ->
    BuiltModel) and ``phases`` (build_datasets) let the tokenizer stages (mllm.stages.llm_stage) reuse this wiring."""
    cfg = resolve_image_settings(cfg)  # before anything saves the recipe: the model records its image settings
    # TrainingArguments come first: they start the process group (data is prepared on the first local
    # rank first) and, under ZeRO-3, let transformers build the LLM already partitioned
    args = training_arguments(cfg, resolve_dtype(cfg.model.dtype), has_eval=cfg.data.eval is not None)
    if cfg.train.deepspeed:  # the launch's world size is known now, and no model is built yet
        path, ds = load_zero_config(cfg.train.deepspeed)
        check_zero_config(ds, cfg, args.world_size, cuda=torch.cuda.is_available(), source=str(path))
    _init_distributed(args)
    # the output folder is this run's (mllm.train.rundir) before anything is written into it; the caller
    # gives it back with trainer.release_output_dir()
    lock = claim_output_dir(cfg, args)
    try:
        trainer = _make_trainer(cfg, args, build, phases)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.run_lock = lock
    if lock is not None:
        weakref.finalize(trainer, lock.release)  # a trainer dropped without release_output_dir()
    return trainer


def _make_trainer(cfg: RecipeConfig, args: TrainingArguments, build, phases) -> MLLMTrainer:
    resume = resume_target(cfg)
    if resume is not None and cfg.train.deepspeed:
        check_resume_world_size(resume, args.world_size, load_zero_config(cfg.train.deepspeed)[1])
    with random_llm_outside_zero_init(cfg, args):
        built = build(cfg, args)
    with args.main_process_first(local=True, desc="data preparation"):
        train_ds, eval_ds, collator = build_datasets(cfg, built.tokenizer, built.model.visual.patch_size,
                                                     phases, built.viq_identity)
    if isinstance(train_ds, PhasedDataset):
        plan_phases(cfg, args, train_ds)
    if args.should_save:
        if resume is None or not (Path(cfg.train.output_dir) / MLLM_CONFIG).exists():  # else rewritten at the end
            save_recipe(cfg, Path(cfg.train.output_dir) / MLLM_CONFIG)
        write_data_summary(cfg.train.output_dir, train_ds, eval_ds)  # the skip counts, by reason
    _init_wandb(cfg, args)
    trainer = MLLMTrainer(
        model=built.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        recipe=cfg, text_tokenizer=built.tokenizer, code_encoder=built.code_encoder,
        callbacks=[JsonlLogger(cfg.train.output_dir)] if "jsonl" in cfg.train.report_to else None,
    )
    trainer.resume_from = resume
    return trainer


def leading_items(dataset) -> Iterator[list[dict]]:
    """The items of a (possibly packed) training data set in order, each as its list of samples, for
    data-dependent starts; every rank reads the same ones, so all ranks agree on the result."""
    for i in range(len(dataset)):
        item = dataset[i]
        yield item if isinstance(item, list) else [item]


def calibrate_projector(trainer: MLLMTrainer, n_samples: int) -> None:
    """Data-dependent start of the projector (mllm.model.projector.Projector.calibrate) on the visual features
    of the first ``n_samples`` training samples."""
    model, feats, seen = trainer.model, [], 0
    with torch.no_grad():
        for item in leading_items(trainer.train_dataset):
            for sample in item:
                if sample.get("image_grids") is not None and len(sample["image_grids"]):
                    pixels, codes = sample.get("pixel_values"), sample.get("codes")
                    if codes is None and trainer.code_encoder is not None:  # codes computed in the step
                        codes = trainer.code_encoder(pixels)
                    feats.append(model.visual(pixel_values=pixels, codes=codes, image_grids=sample["image_grids"]))
            seen += len(item)
            if seen >= n_samples:
                break
    if not feats:
        log.warning("no training image to calibrate the projector on; keeping its init")
        return
    std = model.projector.calibrate(feats)
    log.info("calibrated the projector on %d images (median channel std before: %.4f)", len(feats),
             float(std.median()))


def run_training(cfg: RecipeConfig) -> MLLMTrainer:
    """Train a recipe end to end (resuming as the recipe says) and save into train.output_dir. Restarting a
    finished run with train.resume=true trains and writes nothing (mllm.train.restart)."""
    trainer = prepare_trainer(resolve_data(cfg, check_files=True))

    def calibrate() -> None:
        if cfg.train.calibrate_projector and trainer.resume_from is None:
            calibrate_projector(trainer, cfg.train.calibration_samples)

    try:
        outcome = train_or_restore(trainer, calibrate)
        if outcome == "trained":
            trainer.save_model(cfg.train.output_dir)
            if trainer.eval_dataset is not None:
                trainer.evaluate()
        if outcome != "finished":
            mark_run_complete(trainer)
    finally:
        trainer.release_output_dir()
    return trainer
