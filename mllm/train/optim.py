"""AdamW parameter groups: one per (part, decay) with the part's learning rate from the recipe."""

from __future__ import annotations

import torch
from torch import nn

from mllm.config import PARTS, RecipeConfig
from mllm.model.build import part_of


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    # biases, norm weights and learned vectors (newline/begin/end embeddings, affine) are not decayed
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, cfg: RecipeConfig) -> list[dict]:
    """AdamW groups: one per (part, decay) with the part's learning rate; empty groups are dropped."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        no_decay = is_no_decay(name, param)
        key = (part, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": cfg.part_lr(part),
                           "name": part + ("/no_decay" if no_decay else ""),
                           "weight_decay": 0.0 if no_decay else cfg.train.weight_decay}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the recipe trains nothing: every part is frozen (see trainable.*)")
    order = {p: i for i, p in enumerate(PARTS)}
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], k[1]))]
