"""Running tokenizer stages: one stage from its recipe (``viq train`` on a recipe with a ``stage`` section),
a chain of stages each starting from the previous one's output, and a shapes-only dry run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mllm.config import RecipeConfig, load_recipe
from mllm.data.descriptors import resolve_data
from mllm.stages.decoder import run_decoder_stage
from mllm.stages.init import dry_run_tokenizer
from mllm.stages.llm_stage import build_stage_model, run_llm_stage
from mllm.train.data_setup import resolve_image_settings


def run_stage(cfg: RecipeConfig) -> Path:
    """Train one tokenizer stage; returns its ``viq_tokenizer`` directory."""
    if cfg.stage is None:
        raise ValueError("run_stage needs a recipe with a stage section")
    cfg = resolve_image_settings(resolve_data(cfg, check_files=True))
    if cfg.stage.kind == "decoder":
        return run_decoder_stage(cfg)
    return run_llm_stage(cfg)


def run_chain(recipes: Sequence[str | Path], overrides: Sequence[str] = (), root: str | Path | None = None) -> Path:
    """Run stage recipes in order; ``overrides`` apply to each. With ``root``, stage k writes to
    ``root/<recipe name>`` and (k > 0) starts from stage k-1's output. Returns the last viq_tokenizer."""
    if not recipes:
        raise ValueError("run_chain needs at least one recipe")
    product, previous = None, None
    for path in recipes:
        extra = list(overrides)
        if root is not None:
            extra.append(f"train.output_dir={Path(root) / Path(path).stem}")
            if previous is not None:
                extra.append(f"stage.init={previous}")
        cfg = load_recipe(path, extra)
        if cfg.stage is None:
            raise ValueError(f"{path} has no stage section: run_chain runs tokenizer stages only")
        product = run_stage(cfg)
        previous = cfg.train.output_dir
    return product


def dry_run(cfg: RecipeConfig) -> dict[str, int]:
    """Build a stage's model on the meta device (shapes only: no weights, data or files) and count its
    parameters per part; for checking real-scale recipes on any machine."""
    if cfg.stage is None:
        raise ValueError("dry_run needs a recipe with a stage section")
    # torch caches which functions the device context redirects on first use; if that happened inside
    # transformers' from_pretrained, which swaps torch.linspace for a CPU-pinned wrapper meanwhile, the
    # real linspace stays unredirected for the whole process. Rebuilding the cache restores it.
    constructors = getattr(torch.utils._device, "_device_constructors", None)
    if constructors is not None and hasattr(constructors, "cache_clear"):
        constructors.cache_clear()
    with torch.device("meta"):
        if cfg.stage.kind == "decoder":
            tok = dry_run_tokenizer(cfg)
            counts = {"tokenizer": sum(p.numel() for p in tok.parameters()),
                      "trainable/decoder": sum(p.numel() for p in tok.decoder.parameters())}
            return {**counts, "total": counts["tokenizer"], "trainable": counts["trainable/decoder"]}
        built = build_stage_model(cfg, cuda=False, dry_run=True)
    return built.model.stage_report["parameters"]
