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

Bad input, by extent:
- a record that cannot be read (a non-UTF-8 line, malformed JSON, a value of the wrong type, a bad
  image entry) is skipped with a warning that names the file and the line, record or tar key, and
  counted by reason in the `skipped` Counter when one is passed. With `strict=True` it is a
  ValueError carrying that name instead. Conversation problems (no assistant turn, unknown role,
  text that cannot be encoded) are left to the data set, which counts them with the rest.
- a whole file that cannot be read (a .json that does not parse, a corrupt Parquet file, a
  truncated tar) is a ValueError naming the file and, where the parser says, the position.
Relative image paths are resolved against `image_root`, by default the annotation file's folder;
relative paths stay relative (code keys are made from them), so they mean the same folder as long as
the working directory does not change.
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
    """A record that cannot be turned into a Sample; `reason` is its category in the skip counts."""

    def __init__(self, message: str, reason: str = "bad record"):
        super().__init__(message)
        self.reason = reason


def parse_resize(value) -> tuple[int, int]:
    """ViQ's `"<base>x<multiple>"` -> (area = base^2, multiple)."""
    m = _RESIZE_RE.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise RecordError(f"resize must look like '<base>x<multiple>' with positive numbers, got {value!r}",
                          "bad image entry")
    base, multiple = int(m.group(1)), int(m.group(2))
    return base * base, multiple


def _resolve(path, image_root: Path) -> Path:
    if not isinstance(path, str) or not path:
        raise RecordError(f"image path must be a non-empty string, got {path!r}", "wrong type")
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
                raise RecordError(f"image entry has no 'img_path': {entry!r}", "bad image entry")
            area, multiple = (None, None) if entry.get("resize") is None else parse_resize(entry["resize"])
            refs.append(ImageRef(_resolve(entry["img_path"], image_root), area, multiple))
        else:
            refs.append(ImageRef(_resolve(entry, image_root)))
    return refs


def record_to_sample(record, image_root: Path, fallback_id: str) -> Sample:
    """One LLaVA / ViQ record (a dict) -> Sample; turns become {role, content} with roles normalised."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}", "wrong type")
    convs = record.get("conversations", record.get("messages")) or []
    if not isinstance(convs, list):
        raise RecordError(f"conversations must be a list, got {type(convs).__name__}", "wrong type")
    turns = []
    for turn in convs:
        if not isinstance(turn, dict):
            raise RecordError(f"a turn must be an object, got {turn!r}", "wrong type")
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


# a record-level error: the record is skipped (or, strict, the error raised) and reading goes on
_RECORD_ERRORS = (UnicodeDecodeError, json.JSONDecodeError, RecordError)


def _reason(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "undecodable bytes"
    if isinstance(err, json.JSONDecodeError):
        return "malformed JSON"
    return getattr(err, "reason", "bad record")


@dataclass
class _Skips:
    """Where a reader sends a bad record: a warning and a count, or under `strict` a ValueError."""

    counter: Counter | None = None
    strict: bool = False

    def __call__(self, where: str, err: Exception) -> None:
        reason = _reason(err)
        if self.strict:
            raise ValueError(f"{where}: {reason}: {err} (strict: a bad record stops the run)") from err
        logger.warning("skipping %s (%s): %s", where, reason, err)
        if self.counter is not None:
            self.counter[reason] += 1


def _samples_from_records(records: Iterable, image_root: Path, source: Path, skips: _Skips) -> Iterator:
    for i, record in enumerate(records):
        try:
            yield record_to_sample(record, image_root, f"{source.stem}-{i}")
        except _RECORD_ERRORS as err:
            skips(f"{source} record {i}", err)


def _load_json_file(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_json(path: Path, image_root: Path, skipped: Counter | None = None, *, strict: bool = False
              ) -> Iterator[Sample]:
    records = _load_json_file(path)
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    yield from _samples_from_records(records, image_root, path, _Skips(skipped, strict))


def read_jsonl(path: Path, image_root: Path, skipped: Counter | None = None, *, strict: bool = False
               ) -> Iterator[Sample]:
    skips = _Skips(skipped, strict)
    with path.open("rb") as f:  # bytes: one undecodable line is one bad record, not a failed file
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield record_to_sample(json.loads(line.decode("utf-8-sig")), image_root, f"{path.stem}-{lineno}")
            except _RECORD_ERRORS as err:
                skips(f"{path} line {lineno}", err)


def _row_groups(path: Path) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # row groups one at a time: a large shard never has to fit in memory as Python objects
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from err


def read_parquet(paths: list[Path], image_root: Path, skipped: Counter | None = None, *, strict: bool = False
                 ) -> Iterator[Sample]:
    skips = _Skips(skipped, strict)
    for path in paths:
        offset = 0
        for rows in _row_groups(path):
            for i, row in enumerate(rows, start=offset):
                try:
                    yield record_to_sample(row, image_root, f"{path.stem}-{i}")
                except _RECORD_ERRORS as err:
                    skips(f"{path} record {i}", err)
            offset += len(rows)


def read_hf_disk(path: Path, image_root: Path, skipped: Counter | None = None, *, strict: bool = False
                 ) -> Iterator[Sample]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable save_to_disk data set: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} holds splits {sorted(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    yield from _samples_from_records(ds, image_root, path, _Skips(skipped, strict))


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


def _tar_groups(path: Path, tar: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Members by key (the name up to the first dot of its basename), in tar order; ValueError when the
    archive is cut short."""
    try:
        members = tar.getmembers()
    except tarfile.TarError as err:
        raise ValueError(f"{path} is truncated or corrupt: {err}") from err
    # tarfile takes a header cut short by a truncation for the end of the archive, and says nothing;
    # a complete archive has a zero block where the next header would be
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not end or end.strip(b"\0"):
        raise ValueError(f"{path} is truncated: no end-of-archive marker after its last complete member "
                         f"({members[-1].name if members else 'none'!r})")
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        key, _, ext = base.partition(".")
        groups.setdefault(f"{folder}/{key}" if folder else key, {})["." + ext.lower()] = member
    return groups


def read_webdataset(path: Path, cache_dir: Path, skipped: Counter | None = None, *, strict: bool = False
                    ) -> Iterator[Sample]:
    skips = _Skips(skipped, strict)
    try:
        tar = tarfile.open(path)
    except tarfile.TarError as err:
        raise ValueError(f"{path} is not a readable tar file: {err}") from err
    with tar:
        for key, members in _tar_groups(path, tar).items():
            try:
                yield _webdataset_sample(tar, key, members, cache_dir)
            except _RECORD_ERRORS as err:
                skips(f"{path} key {key!r}", err)


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
        name = key + image_exts[0]
        _extract(tar, member, cache_dir / name)
        # relative to cache_dir, which record_to_sample joins it to (once)
        resize = record.get("resize")
        record = {**record, "image": {"img_path": name, "resize": resize} if resize else name}
        record.pop("resize", None)
    return record_to_sample(record, cache_dir, key)


def read_samples(path, image_root=None, *, skipped: Counter | None = None, strict: bool = False
                 ) -> Iterator[Sample]:
    """Yield the Samples stored at `path`, whichever supported format it is (module docstring).
    A bad record is counted in `skipped` and logged, or with `strict` raised as a ValueError."""
    path = Path(path)
    root = None if image_root is None else Path(image_root)
    opts = {"skipped": skipped, "strict": strict}
    if path.is_dir():
        parquet = sorted(path.glob("*.parquet"))
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return read_hf_disk(path, root or path, **opts)
        if parquet:
            return read_parquet(parquet, root or path, **opts)
        raise ValueError(f"directory {path} is neither a save_to_disk data set nor holds .parquet files")
    if not path.is_file():
        raise ValueError(f"no data file or directory at {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json(path, root or path.parent, **opts)
    if suffix == ".jsonl":
        return read_jsonl(path, root or path.parent, **opts)
    if suffix == ".parquet":
        return read_parquet([path], root or path.parent, **opts)
    if suffix == ".tar":
        return read_webdataset(path, root or path.with_name(path.stem + "_images"), **opts)
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
