"""``viq plan RECIPE [key=value ...] [--world-size N]``: the per-GPU memory of a recipe under each ZeRO stage and
offload (mllm.train.memory), before renting the GPUs."""

from __future__ import annotations

import argparse
import sys

from mllm.config import load_recipe
from mllm.train.memory import plan


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="viq plan", description="Estimate the per-GPU memory of a recipe (weights, gradients, optimizer state, "
        "activations at its sequence length, with and without gradient checkpointing) under each ZeRO stage and "
        "offload, from the parameter counts of its model built on the meta device (shapes only, no weights read).")
    p.add_argument("recipe", help="recipe YAML, or a packaged recipe by name (qwen2.5/sft_lora)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for viq train")
    p.add_argument("--world-size", type=int, default=8, help="number of GPUs over all nodes (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    if args.world_size <= 0:
        parser().error(f"--world-size must be positive, got {args.world_size}")
    try:
        print(plan(load_recipe(args.recipe, args.overrides), args.world_size))
    except (ValueError, OSError) as err:
        print(f"viq plan: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0
