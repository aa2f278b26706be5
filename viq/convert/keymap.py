"""Explicit, strict key maps between checkpoint layouts.

A key map is a list of (source regex, target template) rules; a source key is renamed by the first rule
that matches it in full. Loading is strict both ways: every target tensor must be filled and every source
tensor must be consumed (or explicitly ignored), otherwise a ValueError lists the names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class KeyMapReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # target tensors left at their fresh init
    ignored: list[str] = field(default_factory=list)  # source tensors deliberately not used


def rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


def apply_key_map(model: nn.Module, source: dict[str, torch.Tensor], rules: list[tuple[str, str]], *,
                  what: str, ignore: tuple[str, ...] = (), allow_missing: tuple[str, ...] = (),
                  allow_reshape: bool = False) -> KeyMapReport:
    """Copy ``source`` tensors into ``model`` through ``rules``.

    ``ignore``: regexes of source keys not to use. ``allow_missing``: regexes of target keys that may
    stay at their initial values (reported as re-initialised). With ``allow_reshape`` a target whose
    shape differs from its source is re-initialised and reported instead of raising.
    """
    report = KeyMapReport()
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in source.items():
        if any(re.fullmatch(p, key) for p in ignore):
            report.ignored.append(key)
            continue
        target = rename(key, rules)
        if target is None or target not in own:
            unmapped.append(key if target is None else f"{key} -> {target}")
            continue
        if target in mapped:
            raise ValueError(f"{what}: two source tensors map to {target}")
        mapped[target] = tensor
    shape_errors = []
    for target, tensor in list(mapped.items()):
        if tuple(tensor.shape) != tuple(own[target].shape):
            if not allow_reshape:
                shape_errors.append(f"{target}: {tuple(tensor.shape)} vs {tuple(own[target].shape)}")
            del mapped[target]
    missing = [k for k in own if k not in mapped]
    not_allowed = [k for k in missing if not (allow_reshape or any(re.fullmatch(p, k) for p in allow_missing))]
    if unmapped or not_allowed or shape_errors:
        raise ValueError(f"cannot load {what}: unexpected {unmapped[:10]}, missing {not_allowed[:10]}, "
                         f"shape mismatches {shape_errors[:10]}")
    with torch.no_grad():
        for target, tensor in mapped.items():
            own[target].copy_(tensor.to(own[target].dtype))
    report.loaded = sorted(mapped)
    report.reinitialised = sorted(missing)
    return report
