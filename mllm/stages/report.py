"""The report every tokenizer stage writes beside its output (``stage_report.json``): what was loaded from
the init stage, what was re-initialised, the head's quantizer, parameters per part, the final metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllm.config import RecipeConfig
from mllm.model.build import part_of
from viq.convert.keymap import KeyMapReport
from viq.tokenizer import ViQTokenizer

REPORT_FILE = "stage_report.json"


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (trainable ones under ``trainable/``), the frozen teacher apart."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions: the full size
        part = name.split(".")[0] if name.startswith(("teacher.", "perceptual.")) else part_of(name)
        counts[part] = counts.get(part, 0) + n
        if p.requires_grad:
            counts[f"trainable/{part}"] = counts.get(f"trainable/{part}", 0) + n
    counts["total"] = sum(v for k, v in counts.items() if "/" not in k)
    counts["trainable"] = sum(v for k, v in counts.items() if k.startswith("trainable/"))
    return counts


def stage_report(cfg: RecipeConfig, tok: ViQTokenizer, report: KeyMapReport, init: str,
                 params: dict[str, int]) -> dict:
    h = tok.cfg.head
    return {
        "kind": cfg.stage.kind, "init": init,  # an LLM stage adds its teacher (mllm.stages.teacher.build_teacher)
        "head": {"quantizer": h.quantizer, "levels": list(h.levels) if h.quantizer == "fsq" else None,
                 "code_dim": h.code_dim, "codebook_size": tok.codebook_size if h.quantizer == "fsq" else None},
        "key_map": {"loaded": report.loaded, "reinitialised": report.reinitialised, "ignored": report.ignored},
        "parameters": params,
    }


def write_report(out_dir: str | Path, report: dict) -> Path:
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
