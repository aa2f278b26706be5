"""Supervised multimodal samples: chat-rendered token ids with image spans, and their images.

Preparation (at construction) is cheap: it renders each conversation, reads only the image file
headers (PIL opens lazily), and computes each image's patch grid with the same size rule the image
preprocessing will apply, so every sample's final token length is known before any pixel is
decoded. Each `<image>` token is later expanded into `num_image_tokens(h, w)` copies of itself
(labels -100): the model replaces those positions with the projector's output.

Bad samples never crash an epoch and never carry wrong labels:
- found at preparation (missing or unreadable image, conversation errors, placeholder/image count
  mismatch, too long): skipped, and `skipped[reason]` counted;
- a corrupt image whose header parses but whose data does not decode is only found when it is
  loaded (verifying every file up front would decode the whole data set). Then, in non-strict
  mode, `__getitem__` returns the next good sample in index order (deterministic), and a packed
  batch drops the sample (a pack only gets shorter, so it still fits). Counted as
  "corrupt image (at load)" in the loading process.
`strict=True` turns each of these into a ValueError that names the sample id.

A sample longer than `max_seq_len` is truncated only inside the text after its last image, and only
if a supervised token survives; otherwise it is skipped. Image spans are never cut.

Shapes: L expanded token length; x_3HW one normalised image; grids [n_img, 2] as (h, w).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mllm.data.chat import IGNORE_INDEX, ConversationError, render_conversation
from mllm.data.layout import IMAGE_TOKEN, num_image_tokens
from mllm.data.readers import ImageRef, Sample
from viq.config import PreprocessConfig
from viq.image import MODES, load_image, predict_grid, preprocess

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
    ):
        if image.mode not in MODES:
            raise ValueError(f"unknown image mode {image.mode!r}; expected one of {MODES}")
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no image placeholder token {image_token!r}")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image, self.patch_size = image, patch_size
        self.max_seq_len = max_seq_len
        self.strict = strict
        self.skipped: Counter = Counter()
        self.truncated = 0
        self._bad: set[int] = set()
        self.records = self._prepare_all(samples)
        self.lengths = [r.length for r in self.records]

    # ------------------------------------------------------------------------------ preparation

    def _prepare_all(self, samples: Iterable[Sample]) -> list[PreparedSample]:
        records = []
        n_seen = 0
        for sample in samples:
            n_seen += 1
            try:
                records.append(self._prepare(sample))
            except (SampleError, ConversationError) as err:
                if self.strict:
                    raise ValueError(f"sample {sample.id!r}: {err}") from err
                self.skipped[err.reason] += 1
                logger.info("skipping sample %r (%s): %s", sample.id, err.reason, err)
        if self.skipped:
            logger.warning("kept %d of %d samples; skipped: %s", len(records), n_seen, dict(self.skipped))
        if not records:
            why = dict(self.skipped) or "the input was empty"
            raise ValueError(f"no usable samples: all {n_seen} were skipped ({why})")
        return records

    def _image_args(self, ref: ImageRef) -> dict:
        settings = image_settings(ref, self.image, self.patch_size)
        return {"patch_size": self.patch_size, **dataclasses.asdict(settings)}

    def _grid(self, ref: ImageRef) -> tuple[int, int]:
        if not ref.path.is_file():
            raise SampleError("missing image", f"image file {str(ref.path)!r} does not exist")
        try:
            with Image.open(ref.path) as img:  # lazy: reads the header only
                width, height = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SampleError("corrupt image", f"cannot read image {str(ref.path)!r}: {err}") from err
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
        if cut < after_last_image or not (labels[:cut] != IGNORE_INDEX).any():
            raise SampleError(
                "too long",
                f"{length} tokens > max_seq_len={self.max_seq_len}, and no cut after the last image "
                "keeps a supervised token",
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
