"""Multi-resolution tokenizer training: every image gets its own pixel area, drawn log-uniformly, from one
range for the whole run (stage.area_range) or from each phase's range (stage.area_schedule)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable

from mllm.config import RecipeConfig
from mllm.data.phases import Phase, SampleTransform
from mllm.data.readers import Sample


def sample_area(rng: random.Random, lo: int, hi: int) -> int:
    # log-uniform: every octave of scale between the bounds is equally likely
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _area_transform(lo: int, hi: int, seed: str) -> SampleTransform:
    def transform(samples: Iterable[Sample]) -> Iterable[Sample]:
        rng = random.Random(seed)
        for s in samples:
            yield dataclasses.replace(s, images=[dataclasses.replace(r, resize=sample_area(rng, lo, hi))
                                                 for r in s.images])

    return transform


def area_phases(cfg: RecipeConfig) -> list[Phase] | None:
    """The stage's image areas as data phases (mllm.data.phases): one phase for stage.area_range, one per
    entry of stage.area_schedule; None when the stage sets neither. The areas are drawn (seeded) before
    training: packing needs each sample's token length before any pixel is decoded."""
    stage = cfg.stage
    if stage is None or (stage.area_range is None and stage.area_schedule is None):
        return None
    seed = cfg.train.seed
    if stage.area_range is not None:
        return [Phase(1.0, _area_transform(*stage.area_range, f"viq-area-{seed}"))]
    return [Phase(p.until, _area_transform(*p.area_range, f"viq-area-{seed}-phase{k}"))
            for k, p in enumerate(stage.area_schedule)]
