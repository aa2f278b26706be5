"""The pixel-decoder stage (viq-paper.md §1.5): the ViQ tokenizer frozen, its pixel decoder trained from
codes to pixels with MSE (+ an optional perceptual term) in a plain single-process loop: no LLM, no text.

Each optimizer step takes ``train.grad_accum`` micro-batches of ``train.per_device_batch_size`` images
of ``data.train``, each at its own resolution: ``data.image.area``, or an area drawn afresh from
``stage.area_range`` at every draw (no packing here, so nothing needs the sizes in advance).
Writes ``viq_tokenizer/``, ``log.jsonl`` (with ``recon_psnr`` and the mean-colour baseline
``recon_psnr_mean_colour``, codebook usage and code stability) and ``stage_report.json``.

Training settings, as the Trainer path (mllm.train.trainer) reads them or refused by name:
- ``train.save_steps`` / ``save_total_limit``: ``checkpoint-N/`` every save_steps and at the end (after
  the export, so a final checkpoint means a finished run), rotated as the Trainer path rotates them. Each is
  written into a hidden temporary folder and renamed, so a ``checkpoint-N/`` is always complete (the
  commit, marker and rotation of mllm.train.ckpt_io, shared with the Trainer path).
- ``train.resume`` / ``resume_from_checkpoint``: the newest complete checkpoint (or that one) restores the
  decoder, optimizer, scheduler, RNG, metric window and the position in the draws, so the resumed steps
  log what an uninterrupted run logs. Log lines after the checkpoint's step are dropped: they belong to
  the steps that are trained again. Resuming a finished run trains and writes nothing.
- ``data.eval`` (+ ``train.eval_steps``): reconstruction MSE / PSNR on its images at ``data.image.area``,
  logged as ``eval_*`` at the end (and every eval_steps).
- ``train.report_to``: ``jsonl`` only; a fresh run refuses an output dir that holds another run's log.
- ``train.overwrite_output_dir``: deletes the run files in output_dir first (mllm.train.rundir).
- refused: ``train.deepspeed``, wandb/tensorboard, ``gradient_checkpointing``, ``calibrate_projector``,
  ``data.codes``, and several ranks (torchrun): the decoder is small and trains in one process.

Shape legend: ``N`` packed patches, ``C`` width.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mllm.config import RecipeConfig, resolve_dtype, save_recipe
from mllm.data.readers import dataset_images, require_data_file
from mllm.model.layout import MLLM_CONFIG, VIQ_DIR
from mllm.model.viq_loader import is_viq_dir
from mllm.stages.areas import sample_area
from mllm.stages.init import load_perceptual, load_stage_tokenizer, perceptual_term
from mllm.stages.metrics import StageMetrics, code_stability, psnr_from_mse
from mllm.stages.report import stage_report, write_report
from mllm.train import ckpt_io
from mllm.train.optim import is_no_decay
from mllm.train.rundir import overwrite_output_dir
from mllm.train.trainer import LOG_FILE, resume_target
from viq.configio import ConfigError
from viq.decoder import reconstruction_loss
from viq.image import load_image, pad_to_multiple, preprocess
from viq.tokenizer import ViQTokenizer

log = logging.getLogger(__name__)

# a decoder-stage checkpoint: the trained weights under their tokenizer keys, the Trainer's optimizer and
# scheduler file names, and a state file written last (its presence marks the stage's own layout)
DECODER_WEIGHTS = "decoder.safetensors"
RNG_FILE = "rng_state.pth"
METRICS_FILE = "stage_metrics.pt"
STATE_FILE = "decoder_state.json"


class ImageDraws(Dataset):
    """Key (image index, draw number) -> normalised [3, H, W] pixels, or None for an unreadable image
    (an error with ``data.strict``). With ``area_range`` each draw has its own seeded area."""

    def __init__(self, paths: list[Path], cfg: RecipeConfig, area_range: tuple[int, int] | None, patch_size: int):
        self.paths = paths
        self.patch_size = patch_size
        self.data = cfg.data
        self.area_range = area_range
        self.seed = cfg.train.seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | None:
        i, k = key
        d = self.data
        settings = d.image
        if self.area_range is not None:
            settings = dataclasses.replace(settings, area=sample_area(random.Random(f"viq-area-{self.seed}-{k}"),
                                                                      *self.area_range))
        try:
            x, _ = preprocess(load_image(self.paths[i]), patch_size=self.patch_size, **dataclasses.asdict(settings))
        except ValueError as err:
            if d.strict:
                raise ValueError(f"image {self.paths[i]} (data.strict=true): {err}") from err
            log.warning("skipping image %s: %s", self.paths[i], err)  # one bad file must not end a run
            return None
        return x


class DrawSampler(Sampler):
    """Keys (index, draw number) ``start .. total-1`` of seeded reshuffles of the images, epoch after
    epoch: draw k is image ``perm(epoch k // n)[k % n]``, so a resumed run continues the same sequence."""

    def __init__(self, n: int, total: int, seed: int, start: int = 0):
        self.n, self.total, self.seed, self.start = n, total, seed, start

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self):
        k = self.start
        while k < self.total:
            epoch = k // self.n
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for i in order[k % self.n: k % self.n + self.total - k]:
                yield i, k
                k += 1


def _collate(batch: list[torch.Tensor | None]) -> list[torch.Tensor]:
    return [x for x in batch if x is not None]


def training_images(cfg: RecipeConfig) -> list[Path]:
    d = cfg.data
    require_data_file(d.train)
    return dataset_images(d.train, d.image_root)


def draws_per_step(cfg: RecipeConfig) -> int:
    return cfg.train.grad_accum * cfg.train.per_device_batch_size


def image_loader(cfg: RecipeConfig, paths: list[Path], steps: int, patch_size: int, start_step: int = 0
                 ) -> DataLoader:
    t, per_step = cfg.train, draws_per_step(cfg)
    sampler = DrawSampler(len(paths), steps * per_step, t.seed, start=start_step * per_step)
    return DataLoader(ImageDraws(paths, cfg, cfg.stage.area_range, patch_size), batch_size=t.per_device_batch_size,
                      sampler=sampler, collate_fn=_collate, num_workers=t.dataloader_workers)


def decoder_loss(tok: ViQTokenizer, pixels: list[torch.Tensor], perceptual, weight: float):
    """(loss, metric values, code indices [N, E]) of one micro-batch: codes from the frozen tokenizer,
    features from the codes (as ViQTokenizer.decode computes them), pixels from the trained decoder."""
    dev, patch = tok.device, tok.cfg.encoder.patch_size
    with torch.no_grad():
        out = tok(pixels)
    indices = out.head.indices
    preds = tok.decoder(out.head.features, out.grids, out.cu, out.max_len)
    targets = [pad_to_multiple(x.to(dev), patch) for x in pixels]
    mse = reconstruction_loss(preds, targets)
    baseline = sum(((x - x.mean(dim=(1, 2), keepdim=True)) ** 2).sum() for x in targets) / sum(
        x.numel() for x in targets)
    values = {"recon_loss": mse, "baseline_mse": baseline}
    loss = mse
    if perceptual is not None:
        values["perceptual_loss"] = perceptual_term(perceptual, preds, targets)
        loss = loss + weight * values["perceptual_loss"]
    return loss, values, indices


# --- settings this loop does not implement -------------------------------------------------------------

def refuse_unsupported(cfg: RecipeConfig) -> None:
    """Raise ConfigError naming the first setting the decoder stage would otherwise ignore."""
    t = cfg.train
    one_process = "the decoder stage trains the small pixel decoder in one process"
    if t.deepspeed:
        raise ConfigError(f"train.deepspeed={t.deepspeed!r}: {one_process}, without DeepSpeed; set "
                          "train.deepspeed=null")
    others = [r for r in t.report_to if r != "jsonl"]
    if others:
        raise ConfigError(f"train.report_to={list(t.report_to)}: the decoder stage writes {LOG_FILE} only; "
                          f"{', '.join(others)} come from the Trainer of the LLM stages, which it does not use. "
                          "Set train.report_to=[jsonl] (or [] for no log file)")
    if t.gradient_checkpointing:
        raise ConfigError("train.gradient_checkpointing=true: the decoder stage keeps all activations (its "
                          "tower runs without gradients); set train.gradient_checkpointing=false")
    if t.calibrate_projector:
        raise ConfigError("train.calibrate_projector=true: the decoder stage has no projector; set it to false")
    if cfg.data.codes:
        raise ConfigError(f"data.codes={cfg.data.codes!r}: the decoder stage encodes its training images "
                          "itself (it needs their pixels as targets); set data.codes=null")
    world = _world_size()
    if world > 1:
        raise ConfigError(f"{one_process}, but it was started as {world} ranks (torchrun or another launcher): "
                          "data-parallel decoder training is not implemented, and each rank would train "
                          "the whole loop. Start `viq train` as a single process")


def _world_size() -> int:
    # a launcher publishes the ranks to accelerate, which starts the process group from them exactly as
    # the Trainer path does (mllm.train.trainer.training_arguments); a chain run may have started it already
    dist = torch.distributed
    if not dist.is_available():
        return 1
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return dist.get_world_size() if dist.is_initialized() else 1


# --- checkpoints --------------------------------------------------------------------------------------

def _read_state(ckpt: Path) -> dict | None:
    path = ckpt / STATE_FILE
    if not (path.is_file() and (ckpt / DECODER_WEIGHTS).is_file()):
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return state if isinstance(state, dict) and state.get("kind") == "decoder" else None


def resume_checkpoint(cfg: RecipeConfig) -> tuple[Path, dict] | None:
    """(checkpoint, its state) to resume from, as ``train.resume*`` say; None for a fresh run."""
    t = cfg.train
    if t.resume_from_checkpoint:
        ckpt = Path(resume_target(cfg))  # checks that it is a directory
        state = _read_state(ckpt)
        if state is None:
            raise ConfigError(f"train.resume_from_checkpoint={t.resume_from_checkpoint!r} is not a complete "
                              f"decoder-stage checkpoint ({STATE_FILE} and {DECODER_WEIGHTS} missing or "
                              "not of the decoder stage): name a checkpoint-N/ that a decoder stage wrote")
        return ckpt, state
    if not t.resume:
        return None
    out = Path(t.output_dir)
    ckpt = ckpt_io.newest_complete(out, lambda p: None if _read_state(p) else "not a decoder-stage checkpoint")
    if ckpt is not None:
        return ckpt, _read_state(ckpt)
    log.info("train.resume=true but %s holds no complete checkpoint: starting from scratch", out)
    return None


def _cpu_state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _load_decoder(tok: ViQTokenizer, ckpt: Path) -> None:
    state = {k.removeprefix("decoder."): v for k, v in load_file(str(ckpt / DECODER_WEIGHTS)).items()}
    missing, unexpected = tok.decoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / DECODER_WEIGHTS} does not fit this recipe's decoder: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")


def _rng_state() -> dict:
    # what the step itself may draw from (a perceptual loss, a future augmentation); the data order and
    # areas are seeded per draw and need none of it. numpy is not used by the loop.
    state = {"python": random.getstate(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.random.set_rng_state_all(state["cuda"])


# --- the log ------------------------------------------------------------------------------------------

def open_log(cfg: RecipeConfig, resume: Path | None, start: int) -> Path | None:
    """The log file to append to (None without ``jsonl``). A fresh run never writes into another run's
    log; a resumed one keeps its lines up to the checkpoint's step."""
    if "jsonl" not in cfg.train.report_to:
        return None
    out = Path(cfg.train.output_dir)
    path = out / LOG_FILE
    if not path.exists():
        return path
    if resume is None:
        resume_flag = str(cfg.train.resume).lower()
        raise ConfigError(f"train.output_dir={str(out)!r} already holds {LOG_FILE} of another run, and this run "
                          f"starts fresh (train.resume={resume_flag}, no checkpoint to resume from): its lines "
                          "would mix with that run's. Choose a new train.output_dir, move that log away, or "
                          "resume the run it belongs to from one of its checkpoint-N/")
    if resume.resolve().parent != out.resolve():
        raise ConfigError(f"train.resume_from_checkpoint={str(resume)!r} lies outside train.output_dir="
                          f"{str(out)!r}, which already holds {LOG_FILE} of another run: resume into a new "
                          "train.output_dir, or from a checkpoint of the run that wrote that log")
    ckpt_io.truncate_log(path, start)
    return path


def _log_line(path: Path | None, record: dict) -> None:
    if path is not None:
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
    log.info("step %d: %s", record["step"],
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


# --- the loop -----------------------------------------------------------------------------------------

def _optimizer(tok: ViQTokenizer, cfg: RecipeConfig, steps: int):
    t = cfg.train
    named = list(tok.decoder.named_parameters())
    groups = [{"params": [p for n, p in named if not is_no_decay(n, p)], "weight_decay": t.weight_decay},
              {"params": [p for n, p in named if is_no_decay(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.part_lr("decoder"), betas=tuple(t.adam_betas), eps=1e-8)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=round(t.warmup_ratio * steps),
                                                        num_training_steps=steps, min_lr_rate=t.min_lr_ratio)
    return opt, sched


def _setup(cfg: RecipeConfig):
    tok, report, init = load_stage_tokenizer(cfg)  # checks for an FSQ head and an RGB decoder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok.requires_grad_(False).eval()
    tok.decoder.requires_grad_(True).train()
    tok.to(device)
    perceptual = load_perceptual(cfg.stage.perceptual) if cfg.stage.perceptual else None
    if isinstance(perceptual, torch.nn.Module):
        perceptual.to(device)
    n_train = sum(p.numel() for p in tok.decoder.parameters())
    params = {"tokenizer": sum(p.numel() for p in tok.parameters()), "trainable/decoder": n_train}
    return tok, perceptual, stage_report(cfg, tok, report, init, {**params, "trainable": n_train})


@dataclass
class DecoderRun:
    """One decoder-stage run: the model and its optimizer state, stepped, evaluated and checkpointed."""

    cfg: RecipeConfig
    tok: ViQTokenizer
    perceptual: object
    steps: int
    log_path: Path | None

    def __post_init__(self):
        self.out = Path(self.cfg.train.output_dir)
        self.opt, self.sched = _optimizer(self.tok, self.cfg, self.steps)
        self.metrics = StageMetrics(self.cfg.stage.metrics_window, self.tok.codebook_size)
        self.autocast = torch.autocast(self.tok.device.type, dtype=torch.bfloat16,
                                       enabled=resolve_dtype(self.cfg.model.dtype) == torch.bfloat16)

    def step(self, batches, step: int) -> dict:
        """One optimizer step of ``grad_accum`` micro-batches; its log record (logged every logging_steps)."""
        stage, t = self.cfg.stage, self.cfg.train
        pixels, indices, total = [], None, 0.0
        for _ in range(t.grad_accum):
            pixels = next(batches)
            if not pixels:
                continue
            with self.autocast:
                loss, values, indices = decoder_loss(self.tok, pixels, self.perceptual, stage.perceptual_weight)
            (loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
            self.metrics.add(**values)
            self.metrics.add_codes(indices)
        self.metrics.add(loss=total)
        if stage.stability_every and step % stage.stability_every == 0 and indices is not None:
            self.metrics.add(code_stability=code_stability(self.tok.encoder, self.tok.head, pixels, indices,
                                                           stage.noise_sigma, step))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.tok.decoder.parameters(), t.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if step % t.logging_steps and step != self.steps:
            return {}
        record = {"step": step, **self.metrics.pop(), "grad_norm": float(grad_norm), "learning_rate": lr}
        _log_line(self.log_path, record)
        return record

    @torch.no_grad()
    def evaluate(self, images: list[Path], step: int) -> dict:
        """Reconstruction MSE and PSNR over all pixels of the eval images (as ``recon_psnr`` in training),
        each at ``data.image.area``; logged as ``eval_*``."""
        t = self.cfg.train
        loader = DataLoader(ImageDraws(images, self.cfg, None, self.tok.cfg.encoder.patch_size),
                            batch_size=t.per_device_batch_size,
                            sampler=[(i, 0) for i in range(len(images))], collate_fn=_collate,
                            num_workers=t.dataloader_workers)
        sq, base, numel, n = 0.0, 0.0, 0, 0
        self.tok.decoder.eval()
        for pixels in loader:
            if not pixels:
                continue
            with self.autocast:
                _, values, _ = decoder_loss(self.tok, pixels, None, 0.0)
            size = sum(x.numel() for x in pixels)
            sq, base = sq + float(values["recon_loss"]) * size, base + float(values["baseline_mse"]) * size
            numel, n = numel + size, n + len(pixels)
        self.tok.decoder.train()
        if not n:
            raise ValueError(f"none of the {len(images)} images of data.eval={self.cfg.data.eval!r} could be read")
        record = {"step": step, "eval_recon_loss": sq / numel, "eval_recon_psnr": psnr_from_mse(sq / numel),
                  "eval_recon_psnr_mean_colour": psnr_from_mse(base / numel), "eval_images": n}
        _log_line(self.log_path, record)
        return record

    def restore(self, ckpt: Path) -> None:
        _load_decoder(self.tok, ckpt)
        self.opt.load_state_dict(torch.load(ckpt / OPTIMIZER_NAME, weights_only=True))
        self.sched.load_state_dict(torch.load(ckpt / SCHEDULER_NAME, weights_only=True))
        saved = torch.load(ckpt / METRICS_FILE, weights_only=True)
        self.metrics.sums.update(saved["sums"])
        self.metrics.counts.update(saved["counts"])
        self.metrics.codes.extend(saved["codes"])
        log.info("resumed the decoder stage from %s", ckpt)

    def save(self, step: int) -> Path:
        """``checkpoint-<step>/``, complete or absent: written aside, then renamed into place."""
        final = self.out / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        tmp = ckpt_io.begin_save(self.out, step)
        save_file(_cpu_state(self.tok.decoder, "decoder."), str(tmp / DECODER_WEIGHTS), metadata={"format": "pt"})
        torch.save(self.opt.state_dict(), tmp / OPTIMIZER_NAME)
        torch.save(self.sched.state_dict(), tmp / SCHEDULER_NAME)
        torch.save(_rng_state(), tmp / RNG_FILE)
        m = self.metrics
        torch.save({"sums": m.sums, "counts": m.counts, "codes": list(m.codes)}, tmp / METRICS_FILE)
        save_recipe(self.cfg, tmp / MLLM_CONFIG)
        state = {"kind": "decoder", "global_step": step, "max_steps": self.steps,
                 "draws": step * draws_per_step(self.cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        ckpt_io.commit(tmp, final, step)  # replaces the same step of an earlier try, which this one trained again
        ckpt_io.rotate(self.out, self.cfg.train.save_total_limit, keep=final)
        log.info("saved %s", final)
        return final


def _total_steps(cfg: RecipeConfig, n_images: int) -> int:
    t = cfg.train
    return t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * n_images / draws_per_step(cfg))


def _eval_images(cfg: RecipeConfig) -> list[Path] | None:
    d = cfg.data
    if d.eval is None:
        return None
    require_data_file(d.eval, key="data.eval")
    return dataset_images(d.eval, d.image_root)


def _finished(cfg: RecipeConfig, ckpt: Path, done: int, steps: int) -> Path:
    """A resume whose checkpoint is at (or past) the last step: nothing to train; the export is rewritten
    from the checkpoint only when it is missing."""
    export = Path(cfg.train.output_dir) / VIQ_DIR
    if is_viq_dir(export):
        log.info("the decoder stage finished at step %d of %d (%s): nothing to train, nothing written",
                 done, steps, ckpt)
        return export
    torch.manual_seed(cfg.train.seed)
    tok, _, _ = _setup(cfg)
    _load_decoder(tok, ckpt)
    tok.save_pretrained(export)
    log.info("the decoder stage finished at step %d (%s); re-exported %s", done, ckpt, export)
    return export


def run_decoder_stage(cfg: RecipeConfig) -> Path:
    """Train the pixel decoder of the frozen tokenizer; returns the ``viq_tokenizer`` directory."""
    refuse_unsupported(cfg)
    t = cfg.train
    out = Path(t.output_dir)
    if t.overwrite_output_dir:
        overwrite_output_dir(cfg)
    paths, eval_images = training_images(cfg), _eval_images(cfg)
    steps = _total_steps(cfg, len(paths))
    resume = resume_checkpoint(cfg)
    ckpt, start = (resume[0], resume[1]["global_step"]) if resume else (None, 0)
    if ckpt is not None and start >= steps:
        return _finished(cfg, ckpt, start, steps)
    log_path = open_log(cfg, ckpt, start)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    tok, perceptual, report = _setup(cfg)
    write_report(out, report)
    save_recipe(cfg, out / MLLM_CONFIG)
    run = DecoderRun(cfg, tok, perceptual, steps, log_path)
    batches = iter(image_loader(cfg, paths, steps, tok.cfg.encoder.patch_size, start))
    if ckpt is not None:
        run.restore(ckpt)
        _set_rng_state(torch.load(ckpt / RNG_FILE, weights_only=True))
    record, evaluation = {}, {}
    for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="decoder",
                     disable=not t.progress_bar):
        record = run.step(batches, step) or record
        if eval_images and (step == steps or (t.eval_steps and step % t.eval_steps == 0)):
            evaluation = run.evaluate(eval_images, step)
        if step % t.save_steps == 0 and step < steps:
            run.save(step)
    tok.save_pretrained(out / VIQ_DIR)
    write_report(out, {**report, "final_metrics": record, **({"eval_metrics": evaluation} if evaluation else {})})
    run.save(steps)  # last: a final checkpoint marks a finished run
    log.info("stage decoder done: %s", out / VIQ_DIR)
    return out / VIQ_DIR
