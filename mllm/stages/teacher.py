"""The frozen distillation teacher of a tokenizer stage and where it comes from (viq-reference.md §1.5).

``stage.teacher``:

- ``original`` (the default): the tower the chain started from, as the reference distils every stage from
  the original SigLIP2-g-384. In stage 1 that is ``model.siglip2`` read by ``viq.convert.load_siglip2`` with
  its own table (not the student's resampled one, ``stage.pos_grid``), else the stage's initial encoder.
  Later stages take it from ``chain_teacher`` in ``stage.init``'s ``stage_report.json``, so a chain names
  its teacher once.
- ``previous``: a frozen copy of this stage's initial encoder, i.e. the previous stage's (the reference's
  opt-in ``USE_STAGE1_AS_TEACHER``).
- a ViQ preset, a ViQ tokenizer or stage output directory, or a SigLIP / SigLIP2 Hugging Face directory.

Every stage records ``chain_teacher``: what the next stage's ``original`` loads. A stage with ``previous``
passes its init's on; one with an explicit teacher passes that on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mllm.config import RecipeConfig
from mllm.model.layout import VIQ_DIR
from mllm.model.viq_loader import load_viq, names_viq
from mllm.stages.report import REPORT_FILE
from viq.config import PRESETS as VIQ_PRESETS
from viq.encoder import Encoder

ORIGINAL, PREVIOUS = "original", "previous"


class FrozenTeacher(nn.Module):
    """A frozen encoder whose MAP output on each image, bilinearly resized (aspect ratio not kept) to a
    fixed square, is the distillation target. Like transformers' fixed-resolution SigLIP (a conv with
    valid padding), a square that is not a multiple of the patch loses its last rows and columns."""

    def __init__(self, encoder: Encoder, resolution: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.resolution = resolution
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # the target is the eval-mode teacher's

    def resized(self, x_3HW: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        if tuple(x_3HW.shape[-2:]) != (r, r):
            x_3HW = F.interpolate(x_3HW[None].float(), size=(r, r), mode="bilinear", align_corners=False)[0]
        kept = r // self.encoder.cfg.patch_size * self.encoder.cfg.patch_size
        return x_3HW[:, :kept, :kept]

    @torch.no_grad()
    def forward(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        """Normalised [3, H, W] images -> MAP vectors ``[B, D]``."""
        dev = self.encoder.pos_embed.device
        out = self.encoder.forward_pixels([self.resized(x.to(dev)) for x in pixel_values])
        return self.encoder.pool(out.trunk_ND, out.cu)


def _source(spec: str, seed: int) -> dict:
    """The record of an explicitly named teacher: {"viq": spec, "seed": n} or {"siglip": dir}."""
    if spec in VIQ_PRESETS:
        return {"viq": spec, "seed": seed}
    if names_viq(spec):
        return {"viq": str(Path(spec).resolve())}
    if (Path(spec) / "config.json").is_file():
        return {"siglip": str(Path(spec).resolve())}
    raise ValueError(f"stage.teacher {spec!r} is neither {ORIGINAL!r}, {PREVIOUS!r}, a ViQ preset "
                     f"({', '.join(sorted(VIQ_PRESETS))}), a ViQ tokenizer or stage output directory, nor a SigLIP/"
                     "SigLIP2 Hugging Face directory")


def _starting_tower(cfg: RecipeConfig) -> dict:
    """Stage 1's starting tower: model.siglip2, else the ViQ tokenizer the stage starts from."""
    if cfg.model.siglip2:
        return {"siglip": str(Path(cfg.model.siglip2).resolve())}
    return _source(cfg.stage.init or cfg.model.tokenizer, cfg.train.seed)


def _recorded(init: str) -> dict | None:
    root = Path(init)
    report = (root.parent if root.name == VIQ_DIR else root) / REPORT_FILE
    return json.loads(report.read_text()).get("chain_teacher") if report.is_file() else None


def chain_teacher(cfg: RecipeConfig) -> dict | None:
    """What this stage records for the next stage's ``original``; None when nothing is known (a later stage
    started from a directory that no stage wrote)."""
    stage = cfg.stage
    if stage.teacher not in (ORIGINAL, PREVIOUS):
        return _source(stage.teacher, cfg.train.seed)
    if stage.kind == "stage1":
        return _starting_tower(cfg)
    return _recorded(stage.init) if stage.init else None


def _load(source: dict) -> Encoder:
    if "siglip" in source:
        from viq.convert import load_siglip2

        return load_siglip2(source["siglip"])
    return load_viq(source["viq"], seed=source.get("seed", 0), what="stage.teacher").encoder


def _dry_run_teacher(cfg: RecipeConfig, initial: Encoder) -> tuple[Encoder, str]:
    """The teacher's shapes without reading a file: the initial encoder's, except that an original SigLIP
    tower (stage 1 from model.siglip2, or any later stage's ``original``) keeps its own square table, which a
    fixed-resolution checkpoint has at the teacher's resolution (384 / 16 = 24 for SigLIP2-g-384)."""
    stage = cfg.stage
    if stage.teacher != ORIGINAL or (stage.kind == "stage1" and not cfg.model.siglip2):
        return copy.deepcopy(initial), "a frozen copy of the stage's initial encoder (dry run)"
    side = stage.teacher_resolution // initial.cfg.patch_size
    return (Encoder(dataclasses.replace(initial.cfg, pos_grid=side)),
            f"the original tower's shapes with a {side}x{side} table (dry run)")


def build_teacher(cfg: RecipeConfig, initial: Encoder, dry_run: bool = False) -> tuple[FrozenTeacher | None, dict]:
    """The stage's frozen teacher (None without distillation) and its entries of the stage report.
    ``dry_run``: shapes only (_dry_run_teacher)."""
    stage = cfg.stage
    chain = None if dry_run else chain_teacher(cfg)
    record = {"teacher": {"option": stage.teacher, "resolution": stage.teacher_resolution}, "chain_teacher": chain}
    if stage.distill_weight <= 0:
        return None, record
    if dry_run:
        encoder, record["teacher"]["loaded"] = _dry_run_teacher(cfg, initial)
    elif stage.teacher == PREVIOUS or (stage.kind == "stage1" and stage.teacher == ORIGINAL
                                       and not cfg.model.siglip2):
        record["teacher"]["loaded"] = "a frozen copy of the stage's initial encoder"
        encoder = copy.deepcopy(initial)
    else:
        if chain is None:
            raise ValueError(f"stage.teacher={ORIGINAL}: stage.init {stage.init!r} has no {REPORT_FILE} with a "
                             f"chain_teacher (no tokenizer stage wrote it), so the chain's original tower is not "
                             f"known: name it, stage.teacher=DIR (the SigLIP2 checkpoint stage 1 started from), "
                             f"or use stage.teacher={PREVIOUS}")
        record["teacher"]["loaded"] = chain
        encoder = _load(chain)
    if encoder.cfg.width != initial.cfg.width:
        raise ValueError(f"stage.teacher {stage.teacher!r} ({record['teacher']['loaded']}) has width "
                         f"{encoder.cfg.width}, the student's MAP output has width {initial.cfg.width}: the cosine "
                         "needs equal widths")
    return FrozenTeacher(encoder, stage.teacher_resolution), record
