"""Readers for the supported annotation formats, all yielding one `Sample` type.

Formats (chosen by `read_samples` from the path):
- LLaVA JSON (`.json`, a list): `{"id", "image": str | [str] | absent, "conversations": [{from, value}]}`.
- ViQ JSON: the same, with `image` a dict or list of dicts `{"img_path", "resize": "<base>x<multiple>"}`;
  "384x32" means an area-preserving resize to about 384^2 pixels with sides multiples of 32.
- JSONL (`.jsonl`): one record of either kind per line.
- Local Hugging Face data sets: a `datasets.save_to_disk` directory, or `.parquet` file(s) (a file
  or a directory of them), with the same columns.
- Webdataset (`.tar`): members `<key>.json` (a record) and `<key>.png|jpg|jpeg|webp` (its image).
  Images are extracted once into a cache directory (`image_root`, by default `<name>_images/` next
  to the tar) so that the rest of the pipeline deals with files only and can read image headers
  cheaply; an extracted file of the right size is not rewritten.

A record that cannot be parsed (bad JSON line, not an object, bad image entry) is skipped with a
logged reason, counted in the `skipped` Counter when one is passed. Conversation problems (no
assistant turn, unknown role) are left to the data set, which counts them with the rest.
Relative image paths are resolved against `image_root`, by default the annotation file's folder.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mllm.data.chat import ROLE_ALIASES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_RESIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class ImageRef:
    """An image file; `resize` (pixels of area) and `multiple` override the data set's defaults."""

    path: Path
    resize: int | None = None
    multiple: int | None = None


@dataclass
class Sample:
    id: str
    turns: list[dict]
    images: list[ImageRef] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


class RecordError(ValueError):
    """A record that cannot be turned into a Sample."""


def parse_resize(value) -> tuple[int, int]:
    """ViQ's `"<base>x<multiple>"` -> (area = base^2, multiple)."""
    m = _RESIZE_RE.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise RecordError(f"resize must look like '<base>x<multiple>' with positive numbers, got {value!r}")
    base, multiple = int(m.group(1)), int(m.group(2))
    return base * base, multiple


def _resolve(path, image_root: Path) -> Path:
    if not isinstance(path, str) or not path:
        raise RecordError(f"image path must be a non-empty string, got {path!r}")
    p = Path(path)
    return p if p.is_absolute() else image_root / p


def _image_refs(value, image_root: Path) -> list[ImageRef]:
    if value is None:
        return []
    entries = value if isinstance(value, list) else [value]
    refs = []
    for entry in entries:
        if isinstance(entry, dict):
            if "img_path" not in entry:
                raise RecordError(f"image entry has no 'img_path': {entry!r}")
            area, multiple = (None, None) if entry.get("resize") is None else parse_resize(entry["resize"])
            refs.append(ImageRef(_resolve(entry["img_path"], image_root), area, multiple))
        else:
            refs.append(ImageRef(_resolve(entry, image_root)))
    return refs


def record_to_sample(record, image_root: Path, fallback_id: str) -> Sample:
    """One LLaVA / ViQ record (a dict) -> Sample; turns become {role, content} with roles normalised."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    convs = record.get("conversations", record.get("messages")) or []
    if not isinstance(convs, list):
        raise RecordError(f"conversations must be a list, got {type(convs).__name__}")
    turns = []
    for turn in convs:
        if not isinstance(turn, dict):
            raise RecordError(f"a turn must be an object, got {turn!r}")
        role = turn.get("role", turn.get("from"))
        # unknown roles pass through unchanged: the data set rejects and counts them
        turns.append(
            {"role": ROLE_ALIASES.get(role, role), "content": turn.get("content", turn.get("value"))}
        )
    sid = record.get("id")
    meta = {
        k: v for k, v in record.items() if k not in ("id", "image", "images", "conversations", "messages")
    }
    return Sample(
        id=fallback_id if sid is None else str(sid),
        turns=turns,
        images=_image_refs(record.get("image", record.get("images")), image_root),
        meta=meta,
    )


def _samples_from_records(
    records: Iterable, image_root: Path, stem: str, skipped: Counter | None
) -> Iterator:
    for i, record in enumerate(records):
        try:
            yield record_to_sample(record, image_root, f"{stem}-{i}")
        except RecordError as err:
            _skip(skipped, "bad record", f"{stem} record {i}: {err}")


def _skip(skipped: Counter | None, reason: str, detail: str) -> None:
    logger.warning("skipping %s (%s)", detail, reason)
    if skipped is not None:
        skipped[reason] += 1


def read_json(path: Path, image_root: Path, skipped: Counter | None = None) -> Iterator[Sample]:
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    yield from _samples_from_records(records, image_root, path.stem, skipped)


def read_jsonl(path: Path, image_root: Path, skipped: Counter | None = None) -> Iterator[Sample]:
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield record_to_sample(json.loads(line), image_root, f"{path.stem}-{lineno}")
            except (json.JSONDecodeError, RecordError) as err:
                _skip(skipped, "bad record", f"{path} line {lineno}: {err}")


def read_parquet(paths: list[Path], image_root: Path, skipped: Counter | None = None) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    for path in paths:
        # row groups one at a time: a large shard never has to fit in memory as Python objects
        pf = pq.ParquetFile(path)
        offset = 0
        for g in range(pf.num_row_groups):
            rows = pf.read_row_group(g).to_pylist()
            ids = (f"{path.stem}-{offset + i}" for i in range(len(rows)))
            for row, fallback in zip(rows, ids, strict=True):
                try:
                    yield record_to_sample(row, image_root, fallback)
                except RecordError as err:
                    _skip(skipped, "bad record", f"{path} row {fallback}: {err}")
            offset += len(rows)


def read_hf_disk(path: Path, image_root: Path, skipped: Counter | None = None) -> Iterator[Sample]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} holds splits {sorted(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    yield from _samples_from_records(ds, image_root, path.name, skipped)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    if dest.is_file() and dest.stat().st_size == member.size:
        return
    src = tar.extractfile(member)
    if src is None:
        raise RecordError(f"tar member {member.name!r} is not a regular file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(src.read())
    tmp.replace(dest)


def read_webdataset(path: Path, cache_dir: Path, skipped: Counter | None = None) -> Iterator[Sample]:
    """Group tar members by key (the name up to the first dot of its basename), in tar order."""
    with tarfile.open(path) as tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            key, _, ext = base.partition(".")
            groups.setdefault(f"{folder}/{key}" if folder else key, {})["." + ext.lower()] = member
        for key, members in groups.items():
            try:
                yield _webdataset_sample(tar, key, members, cache_dir)
            except (json.JSONDecodeError, UnicodeDecodeError, RecordError) as err:
                _skip(skipped, "bad record", f"{path} key {key!r}: {err}")


def _webdataset_sample(tar, key: str, members: dict, cache_dir: Path) -> Sample:
    if ".json" not in members:
        raise RecordError(f"no {key}.json member")
    record = json.loads(tar.extractfile(members[".json"]).read().decode("utf-8"))
    image_exts = [ext for ext in members if ext in IMAGE_SUFFIXES]
    if len(image_exts) > 1:
        raise RecordError(f"several images for one key: {sorted(image_exts)}")
    if image_exts and isinstance(record, dict):
        member = members[image_exts[0]]
        if key.startswith("/") or ".." in key.split("/"):
            raise RecordError(
                f"unsafe member name {member.name!r}: it would be extracted outside {cache_dir}"
            )
        dest = cache_dir / (key + image_exts[0])
        _extract(tar, member, dest)
        resize = record.get("resize")
        record = {**record, "image": {"img_path": str(dest), "resize": resize} if resize else str(dest)}
        record.pop("resize", None)
    return record_to_sample(record, cache_dir, key)


def read_samples(path, image_root=None, *, skipped: Counter | None = None) -> Iterator[Sample]:
    """Yield the Samples stored at `path`, whichever supported format it is (module docstring)."""
    path = Path(path)
    root = None if image_root is None else Path(image_root)
    if path.is_dir():
        parquet = sorted(path.glob("*.parquet"))
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return read_hf_disk(path, root or path, skipped)
        if parquet:
            return read_parquet(parquet, root or path, skipped)
        raise ValueError(f"directory {path} is neither a save_to_disk data set nor holds .parquet files")
    if not path.is_file():
        raise ValueError(f"no data file or directory at {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json(path, root or path.parent, skipped)
    if suffix == ".jsonl":
        return read_jsonl(path, root or path.parent, skipped)
    if suffix == ".parquet":
        return read_parquet([path], root or path.parent, skipped)
    if suffix == ".tar":
        return read_webdataset(path, root or path.with_name(path.stem + "_images"), skipped)
    raise ValueError(f"unsupported data file {path}: expected .json, .jsonl, .parquet, .tar or a directory")


def dataset_images(data_path: str | Path, image_root: str | Path | None = None,
                   limit: int | None = None) -> list[Path]:
    """The unique image files a data set references, in first-use order."""
    seen: dict[Path, None] = {}
    for sample in read_samples(data_path, image_root):
        for ref in sample.images:
            seen.setdefault(Path(ref.path), None)
        if limit is not None and len(seen) >= limit:
            break
    paths = list(seen)[:limit]
    if not paths:
        raise ValueError(f"{data_path} references no images")
    return paths


def require_data_file(path: str | Path, key: str = "data.train") -> Path:
    """The annotation file or directory a recipe names; a clear error when it is absent."""
    if not Path(path).exists():
        raise ValueError(f"{key} {str(path)!r} does not exist (a recipe with data.demo: true has `viq train` "
                         "generate the demo set there)")
    return Path(path)
