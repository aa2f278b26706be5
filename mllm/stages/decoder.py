"""The pixel-decoder stage (viq-paper.md §1.5): the ViQ tokenizer frozen, its pixel decoder trained from
codes to pixels with MSE (+ an optional perceptual term) in a plain single-process loop: no LLM, no text.

Each optimizer step takes ``train.grad_accum`` micro-batches of ``train.per_device_batch_size`` images
of ``data.train``, each at its own resolution: ``data.image_area``, or an area drawn afresh from
``stage.area_range`` at every draw (no packing here, so nothing needs the sizes in advance).
Writes ``viq_tokenizer/``, ``log.jsonl`` (with ``recon_psnr`` and the mean-colour baseline
``recon_psnr_mean_colour``, codebook usage and code stability) and ``stage_report.json``.

Shape legend: ``N`` packed patches, ``C`` width.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from mllm.config import RecipeConfig, resolve_dtype, save_recipe
from mllm.data.readers import dataset_images, require_data_file
from mllm.stages.areas import sample_area
from mllm.stages.init import load_perceptual, load_stage_tokenizer, perceptual_term
from mllm.stages.metrics import StageMetrics, code_stability
from mllm.stages.report import stage_report, write_report
from mllm.train.checkpoint import MLLM_CONFIG, VIQ_DIR
from mllm.train.optim import is_no_decay
from mllm.train.trainer import LOG_FILE
from viq.decoder import reconstruction_loss
from viq.image import load_image, pad_to_multiple, preprocess
from viq.tokenizer import ViQTokenizer

log = logging.getLogger(__name__)


class ImageDraws(Dataset):
    """Key (image index, draw number) -> normalised [3, H, W] pixels, or None for an unreadable image."""

    def __init__(self, paths: list[Path], cfg: RecipeConfig):
        self.paths = paths
        self.data = cfg.data
        self.area_range = cfg.stage.area_range
        self.seed = cfg.train.seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | None:
        i, k = key
        d = self.data
        area = d.image_area
        if self.area_range is not None:
            area = sample_area(random.Random(f"viq-area-{self.seed}-{k}"), *self.area_range)
        try:
            x, _ = preprocess(load_image(self.paths[i]), mode=d.image_mode, area=area, multiple=d.image_multiple,
                              min_area=d.min_area, max_area=d.max_area)
        except ValueError as err:  # one bad file must not end a run
            log.warning("skipping image %s: %s", self.paths[i], err)
            return None
        return x


class DrawSampler(Sampler):
    """``total`` keys (index, draw number): seeded reshuffles of the images, epoch after epoch."""

    def __init__(self, n: int, total: int, seed: int):
        self.n, self.total, self.seed = n, total, seed

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        k, epoch = 0, 0
        while k < self.total:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for i in order[: self.total - k]:
                yield i, k
                k += 1
            epoch += 1


def _collate(batch: list[torch.Tensor | None]) -> list[torch.Tensor]:
    return [x for x in batch if x is not None]


def training_images(cfg: RecipeConfig) -> list[Path]:
    d = cfg.data
    require_data_file(d.train)
    return dataset_images(d.train, d.image_root)


def image_loader(cfg: RecipeConfig, paths: list[Path], steps: int) -> DataLoader:
    t = cfg.train
    total = steps * t.grad_accum * t.per_device_batch_size
    return DataLoader(ImageDraws(paths, cfg), batch_size=t.per_device_batch_size,
                      sampler=DrawSampler(len(paths), total, t.seed), collate_fn=_collate,
                      num_workers=t.dataloader_workers)


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


def _optimizer(tok: ViQTokenizer, cfg: RecipeConfig, steps: int):
    t = cfg.train
    named = list(tok.decoder.named_parameters())
    groups = [{"params": [p for n, p in named if not is_no_decay(n, p)], "weight_decay": t.weight_decay},
              {"params": [p for n, p in named if is_no_decay(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.part_lr("decoder"), betas=tuple(t.adam_betas), eps=1e-8)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=round(t.warmup_ratio * steps),
                                                        num_training_steps=steps, min_lr_rate=t.min_lr_ratio)
    return opt, sched


def _log_line(out: Path, record: dict) -> None:
    with (out / LOG_FILE).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    log.info("step %d: %s", record["step"],
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


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


def _step(tok, batches, perceptual, metrics: StageMetrics, cfg: RecipeConfig, step: int, autocast) -> None:
    """Forward and backward of one optimizer step's micro-batches (the optimizer steps outside)."""
    stage, t = cfg.stage, cfg.train
    pixels, indices, total = [], None, 0.0
    for _ in range(t.grad_accum):
        pixels = next(batches)
        if not pixels:
            continue
        with autocast:
            loss, values, indices = decoder_loss(tok, pixels, perceptual, stage.perceptual_weight)
        (loss / t.grad_accum).backward()
        total += loss.detach() / t.grad_accum
        metrics.add(**values)
        metrics.add_codes(indices)
    metrics.add(loss=total)
    if stage.stability_every and step % stage.stability_every == 0 and indices is not None:
        metrics.add(code_stability=code_stability(tok.encoder, tok.head, pixels, indices, stage.noise_sigma, step))


def run_decoder_stage(cfg: RecipeConfig) -> Path:
    """Train the pixel decoder of the frozen tokenizer; returns the ``viq_tokenizer`` directory."""
    t = cfg.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    tok, perceptual, report = _setup(cfg)
    write_report(out, report)
    save_recipe(cfg, out / MLLM_CONFIG)
    (out / LOG_FILE).unlink(missing_ok=True)  # a rerun starts a fresh log
    paths = training_images(cfg)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * len(paths) / (
        t.per_device_batch_size * t.grad_accum))
    batches = iter(image_loader(cfg, paths, steps))
    opt, sched = _optimizer(tok, cfg, steps)
    metrics = StageMetrics(cfg.stage.metrics_window, tok.codebook_size)
    autocast = torch.autocast(tok.device.type, dtype=torch.bfloat16,
                              enabled=resolve_dtype(cfg.model.dtype) == torch.bfloat16)
    record: dict = {}
    for step in range(1, steps + 1):
        _step(tok, batches, perceptual, metrics, cfg, step, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(tok.decoder.parameters(), t.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % t.logging_steps == 0 or step == steps:
            record = {"step": step, **metrics.pop(), "grad_norm": float(grad_norm), "learning_rate": lr}
            _log_line(out, record)
    tok.save_pretrained(out / VIQ_DIR)
    write_report(out, {**report, "final_metrics": record})
    log.info("stage decoder done: %s", out / VIQ_DIR)
    return out / VIQ_DIR
