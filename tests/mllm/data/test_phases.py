"""A curriculum over the run (mllm.data.phases): each optimizer step draws from its phase only, every
phase uses all its items before repeating one, the order is seeded, and accelerate's per-rank sharding
keeps each step inside one phase."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from mllm.data.phases import PhasedDataset, PhaseSampler


def toy(sizes=(10, 4), ends=(0.5, 1.0)) -> PhasedDataset:
    parts, start = [], 0
    for n in sizes:
        parts.append(list(range(start, start + n)))
        start += n
    return PhasedDataset(parts, list(ends))


def phase_of(data: PhasedDataset, i: int) -> int:
    return max(k for k, first in enumerate(data.offsets) if i >= first)


def test_items_and_lengths():
    data = toy()
    assert len(data) == 14 and data.offsets == [0, 10]
    assert [data[i] for i in range(14)] == list(range(14))  # the phases' items one after another
    with pytest.raises(IndexError, match="14"):
        data[14]


def test_steps_follow_phases_and_use_every_item_before_repeating():
    data = toy()
    sampler = PhaseSampler(data, total_steps=6, items_per_step=3, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 18
    steps = [order[s * 3:(s + 1) * 3] for s in range(6)]
    assert [sorted({phase_of(data, i) for i in step}) for step in steps] == [[0], [0], [0], [1], [1], [1]]
    assert sorted(order[:9]) == sorted(set(order[:9])) and set(order[:9]) <= set(range(10))  # 9 of 10, no repeat
    assert sorted(order[9:13]) == [10, 11, 12, 13]  # phase 1 (4 items, 9 draws): a whole pass first,
    assert sorted(order[13:17]) == [10, 11, 12, 13]  # then a second, newly shuffled
    assert order == list(PhaseSampler(data, 6, 3, seed=0))  # seeded: a resumed run skips what it trained on
    assert order != list(PhaseSampler(data, 6, 3, seed=1))
    plan = data.plan(6, 3)
    assert [(p["steps"], p["items"]) for p in plan] == [([0, 3], 9), ([3, 6], 9)]
    assert plan[1]["passes"] == pytest.approx(9 / 4)


def test_run_length_from_epochs():
    data = toy(ends=(0.25, 1.0))
    # an epoch: 0.25 x 10 + 0.75 x 4 = 5.5 items; at 2 items per step, 2 epochs are ceil(11 / 2) steps
    assert data.total_steps(2.0, 2) == 6
    assert data.step_bounds(6) == [2, 6]
    assert data.total_steps(0.01, 100) == 1


@pytest.mark.parametrize("ends", [(0.5,), (0.5, 0.9), (0.6, 0.4), (1.0, 1.0)])
def test_bad_phase_ends(ends):
    with pytest.raises(ValueError, match="increasing end"):
        PhasedDataset([[0], [1]], list(ends))


def test_rank_sharding_keeps_each_step_in_one_phase():
    """accelerate deals consecutive batches to the ranks in turn, so an optimizer step over W ranks and A
    accumulation micro-steps of B items reads the sampler's items [s·G, (s+1)·G), G = B·A·W."""
    data = toy(sizes=(40, 24), ends=(0.5, 1.0))
    b, accum, world, steps = 2, 2, 2, 4
    sampler = PhaseSampler(data, steps, b * accum * world, seed=3)
    per_rank = []
    for rank in range(world):
        batches = BatchSamplerShard(torch.utils.data.BatchSampler(sampler, b, drop_last=False), world, rank)
        per_rank.append(list(batches))
    for rank in range(world):
        assert len(per_rank[rank]) == steps * accum
        for s in range(steps):
            items = [i for batch in per_rank[rank][s * accum:(s + 1) * accum] for i in batch]
            assert {phase_of(data, i) for i in items} == {0 if s < 2 else 1}
    everything = sorted(i for rank in per_rank for batch in rank for i in batch)
    assert everything == sorted(sampler)  # no item lost or doubled between the ranks
