"""A curriculum over the run: the training data prepared once per phase (e.g. at a resolution), and a
sampler whose optimizer steps walk through the phases in order.

A phase ends at a fraction ``until`` of the run's optimizer steps. Packing gives every step the same
token budget, so with ``data.packing`` a fraction of the steps is that fraction of the tokens, which is
how the reference states its schedule (~3B tokens at 384², then ~3B at 768²).

Order: the run is one sampler pass (the Trainer sees one epoch of ``total_steps`` optimizer steps).
The items of step s are the sampler's items [s·G, (s+1)·G), G = per-device batch × accumulation ×
world size, because accelerate deals consecutive batches to the ranks in turn. Phase k's steps draw
from phase k's items only, in seeded shuffles, a new one each time the phase has used them all. The
order depends on the seed and G only, so a resumed run skips exactly the items it has trained on; resumed on
another world size (another G), the phase bounds stay but the remaining steps draw other items.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mllm.data.readers import Sample

logger = logging.getLogger(__name__)

SampleTransform = Callable[[Iterable[Sample]], Iterable[Sample]]


@dataclass(frozen=True)
class Phase:
    until: float  # the fraction of the run's optimizer steps at which the phase ends
    transform: SampleTransform  # what the phase does to the training samples (e.g. their image areas)


def phased_dataset(samples: Iterable[Sample], phases: Sequence[Phase], skipped: Counter,
                   make: Callable[[Iterable[Sample], Counter], torch.utils.data.Dataset]) -> PhasedDataset:
    """One data set per phase from ``make(transformed samples, skip counter)``. Every phase starts its
    counter from the reader's skips (``skipped``), so each phase's summary counts the whole input."""
    samples = list(samples)  # read once: every phase prepares the same records
    parts = []
    for k, phase in enumerate(phases):
        try:
            parts.append(make(phase.transform(samples), Counter(skipped)))
        except ValueError as err:  # e.g. samples too long at this phase's resolution only
            raise ValueError(f"phase {k} of the schedule (until {phase.until}): {err}") from err
    return PhasedDataset(parts, [phase.until for phase in phases])


class PhasedDataset(torch.utils.data.Dataset):
    """The phases' items one after another; ``ends``: each phase's ``until``, increasing, the last 1."""

    def __init__(self, parts: Sequence[torch.utils.data.Dataset], ends: Sequence[float]):
        if len(parts) != len(ends) or not parts or ends[-1] != 1.0 or list(ends) != sorted(set(ends)):
            raise ValueError(f"phases need one increasing end per data set, the last 1.0; got {list(ends)} for "
                             f"{len(parts)} data sets")
        self.parts, self.ends = list(parts), list(ends)
        self.offsets = [0]
        for part in self.parts[:-1]:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.parts[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]

    def shares(self) -> list[float]:
        """Each phase's fraction of the steps."""
        return [b - a for a, b in zip([0.0, *self.ends[:-1]], self.ends, strict=True)]

    def total_steps(self, num_epochs: float, items_per_step: int) -> int:
        """The run's optimizer steps for ``num_epochs``: an epoch has as many items as one pass over the
        data in which each phase contributes its share of the steps, Σ share_k · len(phase k)."""
        per_epoch = sum(share * len(part) for share, part in zip(self.shares(), self.parts, strict=True))
        return max(1, math.ceil(num_epochs * per_epoch / items_per_step))

    def step_bounds(self, total_steps: int) -> list[int]:
        """The step at which each phase ends."""
        return [round(end * total_steps) for end in self.ends]

    def plan(self, total_steps: int, items_per_step: int) -> list[dict]:
        """Per phase: its steps [start, end), its items, and how many passes over its items that is."""
        out, start = [], 0
        for k, end in enumerate(self.step_bounds(total_steps)):
            n = (end - start) * items_per_step
            out.append({"phase": k, "steps": [start, end], "items": n, "passes": n / len(self.parts[k])})
            start = end
        return out


class PhaseSampler(torch.utils.data.Sampler[int]):
    """The whole run's item order (module docstring): ``total_steps`` × ``items_per_step`` indices."""

    def __init__(self, data: PhasedDataset, total_steps: int, items_per_step: int, seed: int):
        if total_steps <= 0 or items_per_step <= 0:
            raise ValueError(f"a phased run needs positive steps and items per step, got {total_steps} and "
                             f"{items_per_step}")
        self.data, self.total_steps, self.items_per_step, self.seed = data, total_steps, items_per_step, seed

    def __len__(self) -> int:
        return self.total_steps * self.items_per_step

    def __iter__(self) -> Iterator[int]:
        for phase in self.data.plan(self.total_steps, self.items_per_step):
            yield from self._draws(phase["phase"], phase["items"])

    def _draws(self, k: int, n: int) -> Iterator[int]:
        rng = random.Random(f"viq-phase-{self.seed}-{k}")
        first, size = self.data.offsets[k], len(self.data.parts[k])
        while n > 0:
            order = list(range(first, first + size))
            rng.shuffle(order)
            yield from order[:n]
            n -= size
