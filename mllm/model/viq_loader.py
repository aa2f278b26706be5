"""The one way a recipe or a command names a ViQ tokenizer: a preset name (seeded random weights), a
tokenizer directory (``config.json`` of the ViQ format + weights), or any directory that holds one as
``viq_tokenizer/`` (a tokenizer stage's output, an MLLM output or export directory)."""

from __future__ import annotations

import json
from pathlib import Path

from mllm.model.layout import VIQ_DIR
from viq.config import PRESETS
from viq.tokenizer import FORMAT, ViQTokenizer


def is_viq_dir(path: Path) -> bool:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        return json.loads(cfg_file.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def viq_dir(spec: str | Path, what: str = "tokenizer") -> Path:
    """The tokenizer directory ``spec`` names (itself or its ``viq_tokenizer/``); ValueError otherwise."""
    path = Path(spec)
    for candidate in (path, path / VIQ_DIR):
        if is_viq_dir(candidate):
            return candidate
    found = "does not exist" if not path.exists() else "holds no ViQ tokenizer"
    raise ValueError(f"{what} {str(spec)!r} {found}: expected a ViQ preset ({', '.join(sorted(PRESETS))}), a ViQ "
                     f"tokenizer directory (config.json of format {FORMAT!r}), or a directory holding {VIQ_DIR}/ "
                     "(a tokenizer stage's output, an MLLM output or export; did that run finish?)")


def names_viq(spec: str | Path) -> bool:
    """Whether ``spec`` names a ViQ tokenizer (for settings that also accept other kinds of model)."""
    return str(spec) in PRESETS or is_viq_dir(Path(spec)) or is_viq_dir(Path(spec) / VIQ_DIR)


def load_viq(spec: str | Path | ViQTokenizer, *, seed: int = 0, what: str = "tokenizer") -> ViQTokenizer:
    """The tokenizer ``spec`` names (an instance is returned as it is); ``what`` names the setting in errors."""
    if isinstance(spec, ViQTokenizer):
        return spec
    if str(spec) in PRESETS:
        return ViQTokenizer.from_preset(str(spec), seed=seed)
    return ViQTokenizer.from_pretrained(viq_dir(spec, what))
