"""Helpers shared by the MLLM tests (a module with a unique name, importable from the tests here)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


def debug_overrides(demo: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Point a debug recipe at the session's demo data and a temporary output directory."""
    return [f"data.train={demo['train']}", "data.demo=false", f"train.output_dir={out}", *extra]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in read_log(out) if "loss" in rec}
