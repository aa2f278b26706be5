"""Multi-resolution tokenizer training: every image gets its own pixel area, drawn log-uniformly."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable

from mllm.config import RecipeConfig
from mllm.data.readers import Sample


def sample_area(rng: random.Random, lo: int, hi: int) -> int:
    # log-uniform: every octave of scale between the bounds is equally likely
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def area_sampler(cfg: RecipeConfig):
    """stage.area_range -> a sample transform giving every image its own pixel area (seeded). Fixed per
    run: packing needs each sample's token length before any pixel is decoded."""
    if cfg.stage is None or cfg.stage.area_range is None:
        return None
    lo, hi = cfg.stage.area_range

    def transform(samples: Iterable[Sample]) -> Iterable[Sample]:
        rng = random.Random(f"viq-area-{cfg.train.seed}")
        for s in samples:
            yield dataclasses.replace(s, images=[dataclasses.replace(r, resize=sample_area(rng, lo, hi))
                                                 for r in s.images])

    return transform
