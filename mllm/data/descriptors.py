"""Data set descriptors: one YAML file per real data set, naming its annotation file, its image root, where it
comes from, its licence, size and checksum, and the commands that prepare it (data/README.md).

A recipe names a descriptor in ``data.train`` (``data.train=llava-665k``); :func:`resolve_data` replaces the
name with the annotation file and, when ``data.image_root`` is null, the descriptor's image root. Descriptors
are looked up as ``data/<name>.yaml`` in the current directory, then among the shipped ones (the top-level
data/ of a source checkout, ``mllm/datasets/`` in the wheel); ``data.train=path/to/desc.yaml`` names a file.
The paths inside a descriptor are relative to the current directory, like every path of a recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from viq.configio import ConfigError, load_config

if TYPE_CHECKING:
    from mllm.config import RecipeConfig

# the wheel carries the top-level data/*.yaml as mllm/datasets (pyproject.toml); a checkout has data/ itself
SHIPPED_DESCRIPTORS = next((d for d in (Path(__file__).parents[1] / "datasets", Path(__file__).parents[2] / "data")
                            if d.is_dir()), None)
# a value with one of these suffixes is an annotation path even when the file is absent (the reader says so)
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".tar")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class MissingDataError(ValueError):
    """A descriptor's files are not on disk; the message says how to get them."""


@dataclass(frozen=True)
class Descriptor:
    annotation: str  # the annotation file or directory (mllm.data.readers.read_samples)
    image_root: str | None = None  # null: the annotation file's folder
    description: str = ""
    source: str = ""
    licence: str = ""
    size: str = ""
    sha256: str | None = None  # of the annotation file; null until a download has been verified
    prepare: tuple[str, ...] = ()  # shell commands, run from the directory the paths are relative to


def _search_dirs() -> list[Path]:
    dirs = [Path("data")]
    if SHIPPED_DESCRIPTORS is not None and SHIPPED_DESCRIPTORS.resolve() != Path("data").resolve():
        dirs.append(SHIPPED_DESCRIPTORS)
    return dirs


def known_descriptors() -> list[str]:
    return sorted({p.stem for d in _search_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_descriptor(value: str) -> Path | None:
    """The descriptor file ``value`` names, or None when it is an ordinary data path."""
    path = Path(value)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"data set descriptor {value} does not exist")
        return path
    if path.exists() or not _NAME.fullmatch(value) or path.suffix.lower() in _DATA_SUFFIXES:
        return None
    for folder in _search_dirs():
        if (folder / f"{value}.yaml").is_file():
            return folder / f"{value}.yaml"
    raise ConfigError(f"data.train {value!r} is neither an existing file or directory nor a data set descriptor "
                      f"(known: {', '.join(known_descriptors()) or 'none'}; see data/README.md)")


def load_descriptor(path: str | Path) -> Descriptor:
    try:
        return load_config(Descriptor, path)
    except ConfigError as err:
        raise ConfigError(f"data set descriptor {path}: {err}") from err


def require_files(name: str, desc: Descriptor, path: Path) -> None:
    """Raise MissingDataError naming the absent files and the commands that prepare them."""
    missing = [p for p in (desc.annotation, desc.image_root) if p is not None and not Path(p).exists()]
    if missing:
        steps = "\n".join(f"  {cmd}" for cmd in desc.prepare) or "  (the descriptor lists no commands)"
        raise MissingDataError(
            f"data set {name!r} ({path}) is not prepared: {', '.join(missing)} not found under {Path.cwd()} "
            f"(its paths are relative to the current directory). Prepare it there with:\n{steps}\n"
            "data/README.md describes every data set.")
    if desc.sha256 is not None and Path(desc.annotation).is_file():
        digest = hashlib.sha256()
        with open(desc.annotation, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != desc.sha256.lower():
            raise MissingDataError(f"data set {name!r} ({path}): {desc.annotation} has sha256 {digest.hexdigest()}, "
                                   f"the descriptor expects {desc.sha256}; download it again")


def resolve_data(cfg: RecipeConfig, check_files: bool = False) -> RecipeConfig:
    """``cfg`` with a descriptor named in ``data.train`` replaced by its files; with ``check_files`` they must
    exist (printing a recipe needs no data, training does)."""
    path = find_descriptor(cfg.data.train)
    if path is None:
        return cfg
    desc = load_descriptor(path)
    if check_files:
        require_files(cfg.data.train, desc, path)
    root = desc.image_root if cfg.data.image_root is None else cfg.data.image_root
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=desc.annotation, image_root=root))
