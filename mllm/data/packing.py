"""Padding-free packing: bins of samples, one packed row per batch, and the padded baseline.

Packed row contract (architecture.md principles 9-10): samples are concatenated into one row;
`position_ids` restart at 0 at each sample, which is how transformers derives the block-diagonal
mask (SDPA) or cu_seqlens (flash-attention) - so no `attention_mask` is emitted, and the model must
be called with `use_cache=False`. `cu_seq_lens` (int32, [n_samples + 1]) marks the boundaries
explicitly. Labels are -100 on prompt, image and padding positions (the data set already did that)
and on the first token of every packed sample, so that no sample is predicted from the one before.
Images and grids are concatenated in the order of the `<image>` spans in the row: `pixel_values` as a
list of per-image tensors, `codes` as ONE flat tensor (each sample's flat codes, mllm.data.codes, one after
another; `image_grids` splits it). A DataLoader worker sends every tensor of a batch through its own
shared-memory segment, and one per image cost more than building the row.

Shapes: T packed tokens; B batch rows; L the longest sample of a padded batch.
"""

from __future__ import annotations

import bisect
import logging
import numbers
import random
from collections.abc import Sequence

import torch

from mllm.data.chat import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pack_best_fit_decreasing(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= max_seq_len (best-fit decreasing).

    Samples are placed longest first (ties: lower index first) into the open bin with the least room
    that still fits them (ties: the earlier bin), else into a new bin. Deterministic.
    """
    if not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    for i, n in enumerate(lengths):
        if not isinstance(n, numbers.Integral) or n <= 0 or n > max_seq_len:
            raise ValueError(
                f"sample {i} has length {n!r}; lengths must be in [1, max_seq_len={max_seq_len}]"
            )
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free space, bin index) of bins that are not full
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            free, b = max_seq_len - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """Items are packs: lists of the wrapped data set's items whose lengths sum to <= max_seq_len.

    The pack order is shuffled once with `seed`, because best-fit decreasing emits the longest
    samples first and a sequential sampler would otherwise see a length curriculum. A sample whose
    image fails to decode is dropped from its pack (the pack only gets shorter).
    """

    def __init__(self, dataset, max_seq_len: int, seed: int = 0):
        self.dataset = dataset
        self.max_seq_len = max_seq_len
        self.packs = pack_best_fit_decreasing(list(dataset.lengths), max_seq_len)
        random.Random(seed).shuffle(self.packs)
        n_tokens = sum(dataset.lengths)
        logger.info(
            "packed %d samples into %d rows of <= %d tokens (%.1f%% filled)",
            len(dataset.lengths),
            len(self.packs),
            max_seq_len,
            100.0 * n_tokens / max(1, len(self.packs) * max_seq_len),
        )

    def __len__(self) -> int:
        return len(self.packs)

    def _load(self, i: int) -> dict | None:
        loader = getattr(self.dataset, "try_load", None)
        return loader(i) if loader is not None else self.dataset[i]

    def __getitem__(self, j: int) -> list[dict]:
        n = len(self.packs)
        for k in range(n):
            items = [it for it in (self._load(i) for i in self.packs[(j + k) % n]) if it is not None]
            if items:
                return items
        raise ValueError(f"none of the {n} packs has a loadable sample; see the logged errors")


def _flatten(items) -> list[dict]:
    # a DataLoader over PackedDataset hands the collator a list of packs (lists of samples)
    flat: list[dict] = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    if not flat:
        raise ValueError("cannot collate an empty batch")
    return flat


def _images(samples: list[dict]) -> dict:
    """The batch's visual inputs: `pixel_values` (a list), or `codes` (one flat tensor) when the samples come
    from stored ViQ codes (mllm.data.codes), with `image_grids`; images in sample order. A batch never mixes
    the two."""
    grids = [s["image_grids"].reshape(-1, 2) for s in samples]
    image_grids = torch.cat(grids).long() if grids else torch.zeros(0, 2, dtype=torch.long)
    if any("codes" in s for s in samples):
        # the codes' count per grid is the model's check (it knows the codes per patch)
        if any(len(g) and "codes" not in s for s, g in zip(samples, grids, strict=True)):
            raise ValueError("a sample has images but no codes (pixels and codes mixed?)")
        codes = torch.cat([s["codes"].reshape(-1) for s in samples if "codes" in s]).long()
        return {"codes": codes, "image_grids": image_grids}
    values = [x for s in samples for x in s.get("pixel_values", ())]
    if len(values) != len(image_grids):
        raise ValueError(f"{len(values)} pixel_values for {len(image_grids)} image grids")
    return {"pixel_values": values, "image_grids": image_grids}


def collate_packed(items) -> dict:
    """Samples (or packs of samples) -> ONE packed row [1, T]; see the module docstring."""
    samples = _flatten(items)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    if min(lengths) == 0:
        raise ValueError(f"cannot pack an empty sample: lengths {lengths}")
    input_ids = torch.cat([s["input_ids"].reshape(-1) for s in samples]).long()
    labels = torch.cat([s["labels"].reshape(-1) for s in samples]).long().clone()
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    labels[cu[:-1].long()] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "position_ids": position_ids[None],
        "cu_seq_lens": cu,
        **_images(samples),
    }


def collate_padded(items, pad_token_id: int) -> dict:
    """Samples -> a right-padded batch [B, L] with `attention_mask` (the unpacked baseline)."""
    samples = _flatten(items)
    if not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an integer, got {pad_token_id!r}")
    lengths = [int(s["input_ids"].numel()) for s in samples]
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        input_ids[b, :n] = s["input_ids"].reshape(-1)
        labels[b, :n] = s["labels"].reshape(-1)
        attention_mask[b, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        **_images(samples),
    }
