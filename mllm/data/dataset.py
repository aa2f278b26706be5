"""Supervised multimodal samples: chat-rendered token ids with image spans, and their images.

Preparation (at construction) renders each conversation, reads each image file's header and checks
its integrity without decoding pixels (viq.image.verify_image: for PNG every chunk's checksum, which
costs one read of the file; the time is logged), and computes each image's patch grid with the same
size rule the image preprocessing will apply, so every sample's final token length is known before
any pixel is decoded. Each `<image>` token is later expanded into `num_image_tokens(h, w)` copies of itself
(labels -100): the model replaces those positions with the projector's output.

Bad samples never crash an epoch and never carry wrong labels:
- found at preparation (missing image, unreadable or corrupt image, conversation errors,
  placeholder/image count mismatch, too long, every label masked): skipped, and `skipped[reason]`
  counted. The Counter may be shared with the reader (`skipped=`), so that the records it could not
  read are in the same counts. More than `max_skip_fraction` of all samples skipped is a ValueError
  with the counts: a data set that lost that much is more likely broken than noisy;
- an image that passes the checks but still does not decode (its data damaged where no checksum
  looks, or the file changed since) is found when it is loaded (viq.image.load_image decodes
  fully). Then, in non-strict mode, `__getitem__` returns the next good sample in index order
  (deterministic), and a packed batch drops the sample (a pack only gets shorter, so it still fits).
  Counted as "corrupt image (at load)" in the loading process.
`strict=True` turns each of these into a ValueError that names the sample id.

A sample longer than `max_seq_len` is truncated only inside the text after its last image, and only
if a supervised token survives; otherwise it is skipped. Image spans are never cut. A sample with no
supervised token (its answers truncated away, or a chat template whose answers the label finder
cannot find) would only dilute the loss: skipped as "all labels masked".

Shapes: L expanded token length; x_3HW one normalised image; grids [n_img, 2] as (h, w).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mllm.data.chat import IGNORE_INDEX, ConversationError, render_conversation
from mllm.data.layout import IMAGE_TOKEN, num_image_tokens
from mllm.data.readers import ImageRef, Sample
from viq.config import PreprocessConfig
from viq.image import MODES, load_image, predict_grid, preprocess, verify_image

logger = logging.getLogger(__name__)


class SampleError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PreparedSample:
    """A rendered sample: unexpanded ids/labels (int32) and one patch grid per image."""

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[ImageRef]
    grids: list[tuple[int, int]]
    length: int
    meta: dict = field(default_factory=dict)


def image_settings(ref: ImageRef, base: PreprocessConfig, patch_size: int) -> PreprocessConfig:
    """The preprocessing one image gets: the base settings with the reference's own overrides.

    A per-image multiple such as ViQ's "384x16" can give an odd patch grid, which the 2x2 pooling
    projector cannot take; it is widened to its least common multiple with two patches.
    """
    out = base
    if ref.resize is not None:
        out = dataclasses.replace(out, area=ref.resize)
    if ref.multiple is not None:
        out = dataclasses.replace(out, multiple=math.lcm(int(ref.multiple), 2 * patch_size))
    return out


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style data set of chat samples with images; see the module docstring for the policy."""

    def __init__(
        self,
        samples: Iterable[Sample],
        tokenizer,
        *,
        patch_size: int,
        image: PreprocessConfig,
        max_seq_len: int = 2048,
        strict: bool = False,
        image_token: str = IMAGE_TOKEN,
        max_skip_fraction: float | None = None,
        skipped: Counter | None = None,
        image_sizes: dict[Path, tuple[int, int]] | None = None,
    ):
        if image.mode not in MODES:
            raise ValueError(f"unknown image mode {image.mode!r}; expected one of {MODES}")
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no image placeholder token {image_token!r}")
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image, self.patch_size = image, patch_size
        self.max_seq_len = max_seq_len
        self.strict = strict
        self.max_skip_fraction = max_skip_fraction
        self.skipped: Counter = Counter() if skipped is None else skipped
        self.truncated = 0
        self.seen = 0  # samples read, kept or skipped (the reader's skips included when it shares the Counter)
        self._check_s = 0.0
        self._bad: set[int] = set()
        # (width, height) of each image already checked: data sets prepared from the same files (the phases
        # of mllm.data.phases) share it, so each file is read once
        self._sizes = {} if image_sizes is None else image_sizes
        self.records = self._prepare_all(samples)
        self.lengths = [r.length for r in self.records]

    # ------------------------------------------------------------------------------ preparation

    def _prepare_all(self, samples: Iterable[Sample]) -> list[PreparedSample]:
        records = []
        before = sum(self.skipped.values())
        t0 = time.perf_counter()
        for sample in samples:
            try:
                records.append(self._prepare(sample))
            except (SampleError, ConversationError) as err:
                if self.strict:
                    raise ValueError(f"sample {sample.id!r}: {err}") from err
                self.skipped[err.reason] += 1
                logger.info("skipping sample %r (%s): %s", sample.id, err.reason, err)
        n_skipped = sum(self.skipped.values()) - before
        self.seen = len(records) + n_skipped
        logger.info("prepared %d samples in %.1f s, %.1f s of it checking images", self.seen,
                    time.perf_counter() - t0, self._check_s)
        if n_skipped:
            logger.warning("kept %d of %d samples; skipped: %s", len(records), self.seen, dict(self.skipped))
        if not records:
            why = dict(self.skipped) or "the input was empty"
            raise ValueError(f"no usable samples: all {self.seen} were skipped ({why})")
        if self.max_skip_fraction is not None and n_skipped > self.max_skip_fraction * self.seen:
            raise ValueError(
                f"{n_skipped} of {self.seen} samples skipped ({n_skipped / self.seen:.1%}), more than "
                f"max_skip_fraction={self.max_skip_fraction} (data.max_skip_fraction): {dict(self.skipped)}; "
                "the log names each one. Fix the data, or raise the limit"
            )
        return records

    def _image_args(self, ref: ImageRef) -> dict:
        settings = image_settings(ref, self.image, self.patch_size)
        return {"patch_size": self.patch_size, **dataclasses.asdict(settings)}

    def _grid(self, ref: ImageRef) -> tuple[int, int]:
        if not ref.path.is_file():
            raise SampleError("missing image", f"image file {str(ref.path)!r} does not exist")
        if ref.path not in self._sizes:
            t0 = time.perf_counter()
            try:
                self._sizes[ref.path] = verify_image(ref.path)
            except ValueError as err:
                raise SampleError("corrupt image", str(err)) from err
            finally:
                self._check_s += time.perf_counter() - t0
        width, height = self._sizes[ref.path]
        try:
            grid = predict_grid(width, height, **self._image_args(ref))
            num_image_tokens(*grid)
        except ValueError as err:
            raise SampleError("bad image size", f"image {str(ref.path)!r} ({width}x{height}): {err}") from err
        return grid

    def _prepare(self, sample: Sample) -> PreparedSample:
        conv = render_conversation(sample.turns, self.tokenizer, image_token=self.image_token)
        ids = np.asarray(conv["input_ids"], dtype=np.int32)
        labels = np.asarray(conv["labels"], dtype=np.int32)
        n_placeholders = int((ids == self.image_token_id).sum())
        if n_placeholders != len(sample.images):
            raise SampleError(
                "image count mismatch",
                f"{n_placeholders} {self.image_token} placeholders but {len(sample.images)} images",
            )
        if not (labels != IGNORE_INDEX).any():
            raise SampleError(
                "all labels masked",
                "no token is supervised: the chat template hides the answers from the label finder "
                "(mllm.data.chat), or they hold nothing but image placeholders",
            )
        grids = [self._grid(ref) for ref in sample.images]
        extra = sum(num_image_tokens(*g) for g in grids) - n_placeholders
        length = len(ids) + extra
        if length > self.max_seq_len:
            ids, labels = self._truncate(ids, labels, extra, length)
            length = len(ids) + extra
        return PreparedSample(sample.id, ids, labels, list(sample.images), grids, length, dict(sample.meta))

    def _truncate(self, ids: np.ndarray, labels: np.ndarray, extra: int, length: int):
        """Cut the text after the last image to fit max_seq_len, keeping a supervised token."""
        cut = self.max_seq_len - extra  # in unexpanded positions: all images stay before the cut
        placeholders = np.flatnonzero(ids == self.image_token_id)
        after_last_image = int(placeholders[-1]) + 1 if len(placeholders) else 0
        if cut < after_last_image:
            raise SampleError(
                "too long",
                f"{length} tokens > max_seq_len={self.max_seq_len}, and a cut would fall inside an image span",
            )
        if not (labels[:cut] != IGNORE_INDEX).any():
            raise SampleError(
                "all labels masked",
                f"{length} tokens > max_seq_len={self.max_seq_len}, and the cut after the last image "
                "leaves no supervised token",
            )
        self.truncated += 1
        logger.info("truncating a sample from %d to %d tokens", length, self.max_seq_len)
        return ids[:cut], labels[:cut]

    # ---------------------------------------------------------------------------------- loading

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> dict:
        """Sample i with decoded images; ValueError if an image cannot be decoded."""
        rec = self.records[i]
        pixel_values = []
        for ref, grid in zip(rec.images, rec.grids, strict=True):
            x_3HW, got = preprocess(load_image(ref.path), **self._image_args(ref))
            if tuple(got) != tuple(grid):
                raise RuntimeError(f"image {str(ref.path)!r}: grid {got} differs from the prepared {grid}")
            pixel_values.append(x_3HW)
        ids = rec.input_ids.astype(np.int64)
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[ids == self.image_token_id] = [num_image_tokens(*g) for g in rec.grids]
        # labels are already -100 on the placeholders, so repeating them keeps image spans unsupervised
        return {
            "input_ids": torch.from_numpy(np.repeat(ids, repeats)),
            "labels": torch.from_numpy(np.repeat(rec.labels.astype(np.int64), repeats)),
            "pixel_values": pixel_values,
            "image_grids": torch.tensor(rec.grids, dtype=torch.long).reshape(-1, 2),
        }

    def try_load(self, i: int) -> dict | None:
        """load(i), or None (counted, logged) when an image fails to decode; strict mode raises."""
        if i in self._bad:
            return None
        try:
            return self.load(i)
        except ValueError as err:
            rid = self.records[i].id
            if self.strict:
                raise ValueError(f"sample {rid!r}: {err}") from err
            self._bad.add(i)
            self.skipped["corrupt image (at load)"] += 1
            logger.warning("sample %r cannot be loaded, skipping it: %s", rid, err)
            return None

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        for k in range(n):
            item = self.try_load((i + k) % n)
            if item is not None:
                return item
        raise ValueError(f"none of the {n} samples can be loaded; see the logged errors")


DATA_SUMMARY = "data_summary.json"


def skip_summary(dataset) -> dict | None:
    """Samples kept, seen and truncated, and skipped by reason, of a data set as prepared (a
    PackedDataset's too); None for None. Skips at load time happen later, in the loader's processes."""
    if dataset is None:
        return None
    if hasattr(dataset, "parts"):  # a PhasedDataset: each phase prepared the samples at its own settings
        return {"phases": [skip_summary(part) for part in dataset.parts]}
    ds = getattr(dataset, "dataset", dataset)  # PackedDataset keeps the samples' data set
    return {"kept": len(ds.records), "seen": ds.seen, "truncated": ds.truncated, "skipped": dict(ds.skipped)}


def write_data_summary(output_dir, train, evaluation=None) -> Path:
    """``output_dir/data_summary.json``: skip_summary of the training and evaluation data sets."""
    path = Path(output_dir) / DATA_SUMMARY
    summary = {"train": skip_summary(train), "eval": skip_summary(evaluation)}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
