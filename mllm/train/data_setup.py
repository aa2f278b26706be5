"""The training data of a recipe: its data sets (samples, packs, phases or stored codes), the image settings
they are prepared with, and a phased run's length."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections import Counter
from pathlib import Path

from transformers import TrainingArguments

from mllm.config import RecipeConfig
from mllm.data.codes import CodeStore, codes_dataset
from mllm.data.dataset import SupervisedDataset
from mllm.data.packing import PackedDataset, collate_packed, collate_padded
from mllm.data.phases import Phase, PhasedDataset, phased_dataset
from mllm.data.readers import read_samples, require_data_file
from viq.config import PreprocessConfig

log = logging.getLogger(__name__)


def _dataset(cfg: RecipeConfig, path: str, tokenizer, patch_size: int, phases: list[Phase] | None = None,
             store: CodeStore | None = None):
    d = cfg.data
    limits = {"strict": d.strict, "max_skip_fraction": d.max_skip_fraction}

    def packed(ds):
        return PackedDataset(ds, d.max_seq_len, seed=cfg.train.seed) if d.packing else ds

    if store is not None:  # codes extracted offline: the step decodes no image and runs no encoder
        return packed(codes_dataset(path, tokenizer, store, image_root=d.image_root, max_seq_len=d.max_seq_len,
                                    **limits))
    image_sizes = {}  # each image file is checked once, however many phases prepare it

    def prepared(samples, skipped: Counter):
        return packed(SupervisedDataset(samples, tokenizer, patch_size=patch_size, image=d.image,
                                        max_seq_len=d.max_seq_len, skipped=skipped, image_sizes=image_sizes,
                                        **limits))

    skipped = Counter()  # the reader's skips and the data set's, in one count
    samples = read_samples(path, d.image_root, skipped=skipped, strict=d.strict)
    if phases is not None and len(phases) > 1:
        return phased_dataset(samples, phases, skipped, prepared)
    return prepared(phases[0].transform(samples) if phases else samples, skipped)


def open_code_store(cfg: RecipeConfig, viq_identity: dict | None, patch_size: int) -> CodeStore:
    """data.codes, checked against what the run will be: its tokenizer, its image settings, its patch size.
    The saved recipe then describes the codes the model was trained on, which is what inference repeats."""
    store = CodeStore(cfg.data.codes, expected_tokenizer=viq_identity)
    if store.image != cfg.data.image:
        raise ValueError(f"codes in {cfg.data.codes} were extracted with image settings {store.image}, but the "
                         f"recipe has data.image={cfg.data.image}: set data.image.* to the codes' values, or "
                         "extract again with the recipe's")
    if store.patch_size != patch_size:
        raise ValueError(f"codes in {cfg.data.codes} have {store.patch_size}-pixel patches, the model's encoder "
                         f"{patch_size}-pixel ones")
    return store


def resolve_image_settings(cfg: RecipeConfig) -> RecipeConfig:
    """``cfg`` with a concrete ``data.image``: a stated one as it is (open_code_store holds it against the
    codes'), else the codes' own settings when ``data.codes`` is set, else the defaults. Everything after
    this, the saved recipe included, sees the settings the model is actually trained on."""
    if cfg.data.image is not None:
        return cfg
    image = PreprocessConfig()
    if cfg.data.codes:
        # the manifest alone: CodeStore would read every shard, and build_datasets opens it once anyway
        manifest = Path(cfg.data.codes) / "manifest.json"
        try:
            image = PreprocessConfig(**json.loads(manifest.read_text())["preprocess"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"data.codes={cfg.data.codes!r}: cannot read the codes' image settings from {manifest} "
                             f"({type(err).__name__}: {err}); is it a finished `viq extract` output?") from err
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image=image))


def build_datasets(cfg: RecipeConfig, tokenizer, patch_size: int, phases: list[Phase] | None = None,
                   viq_identity: dict | None = None):
    """(train, eval or None, collator). ``patch_size``: the visual encoder's (image grids are counted in it).
    ``phases``: what happens to the training samples (mllm.data.phases), e.g. the tokenizer stages' image
    areas; several phases give a PhasedDataset, which the run's sampler walks through in order."""
    cfg = resolve_image_settings(cfg)
    d = cfg.data
    require_data_file(d.train)
    store = open_code_store(cfg, viq_identity, patch_size) if d.codes else None
    train = _dataset(cfg, d.train, tokenizer, patch_size, phases, store)
    evaluation = _dataset(cfg, d.eval, tokenizer, patch_size, store=store) if d.eval else None
    collator = collate_packed if d.packing else functools.partial(collate_padded,
                                                                  pad_token_id=tokenizer.pad_token_id)
    return train, evaluation, collator


def items_per_step(args: TrainingArguments) -> int:
    """Training items (packs, or samples without packing) in one optimizer step over all ranks."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def plan_phases(cfg: RecipeConfig, args: TrainingArguments, data: PhasedDataset) -> None:
    """Fix the run's length in steps (a phase ends at a fraction of them) and log each phase's share."""
    if args.max_steps <= 0:
        args.max_steps = data.total_steps(cfg.train.num_epochs, items_per_step(args))
    for p in data.plan(args.max_steps, items_per_step(args)):
        log.info("phase %d: optimizer steps [%d, %d), %d items, %.2f passes over its %d items", p["phase"],
                 *p["steps"], p["items"], p["passes"], len(data.parts[p["phase"]]))
