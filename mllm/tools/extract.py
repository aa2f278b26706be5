"""Offline code extraction: every image a data set references -> ViQ codes in Parquet shards.

Layout of an output directory:
- ``plan.json``: what this extraction is (tokenizer identity, preprocessing, shard count, a hash of
  the key list). Re-running into a directory that holds a different plan is a ValueError, so two
  extractions never mix.
- ``codes-SSSSS-of-NNNNN.parquet``: columns ``key`` (string), ``h``, ``w`` (int32, the patch grid,
  stored once per image), ``codes`` (list<uint16> when the codebook fits 16 bits, else list<int32>;
  ``h*w*E`` indices in patch raster order, sub-code minor, exactly ``Codes.indices``); rows by key.
- ``codes-SSSSS-of-NNNNN.failures.jsonl``: the shard's unreadable images (key + reason), written
  before its Parquet file, so a finished shard always has it.
- ``failures.jsonl`` and ``manifest.json``: written by whichever process finds every shard done.

An image fails when it cannot be read, or does not pass Pillow's integrity checks, or does not decode
(viq.image.load_image). ``viq extract`` exits 1 when no image could be extracted, or when more than
``max_fail_fraction`` of them failed (an override, 0.1 by default); failures.jsonl lists them either way.

Image keys, the tokenizer identity and the per-image preprocessing rule: mllm.data.codes.

Determinism: keys are sorted, shard s holds keys [s*shard_size, (s+1)*shard_size), and within a shard
images are batched by a fixed rule (ascending patch count, then key). So one shard's bytes depend only
on its images and the tokenizer: rank r takes shards r, r+world_size, ...; a killed run leaves no half
shard (temporary file + rename), and a re-run skips finished shards and yields identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from mllm.data.codes import (
    FORMAT,
    FORMAT_VERSION,
    UINT16_MAX_CODEBOOK,
    default_image_root,
    image_key,
    sha256_file,
    sha256_json,
    tokenizer_identity,
)
from mllm.data.dataset import image_settings
from mllm.data.readers import ImageRef, read_samples
from mllm.model.viq_loader import load_viq
from viq.config import PreprocessConfig
from viq.configio import to_dict
from viq.image import load_image, predict_grid, preprocess
from viq.tokenizer import ViQTokenizer

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- images


def collect_images(dataset_path, image_root=None) -> tuple[list[tuple[str, ImageRef]], int]:
    """Every unique image the data set references, sorted by key; and the number of samples read."""
    root = Path(image_root) if image_root is not None else default_image_root(dataset_path)
    refs: dict[str, ImageRef] = {}
    n_samples = 0
    for sample in read_samples(dataset_path, image_root):
        n_samples += 1
        for ref in sample.images:
            refs.setdefault(image_key(ref, root), ref)
    return sorted(refs.items()), n_samples


def _grid_from_header(ref: ImageRef, p: PreprocessConfig, patch_size: int) -> tuple[int, int]:
    with Image.open(ref.path) as img:  # lazy: reads the header only
        width, height = img.size
    return predict_grid(width, height, patch_size=patch_size, **dataclasses.asdict(p))


def _decode(ref: ImageRef, p: PreprocessConfig, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    x_3HW, got = preprocess(load_image(ref.path), patch_size=patch_size, **dataclasses.asdict(p))
    if tuple(got) != tuple(grid):
        raise ValueError(f"decoded grid {tuple(got)} differs from the header's {tuple(grid)}")
    return x_3HW


def plan_batches(grids: list[tuple[int, int]], batch_patches: int) -> list[list[int]]:
    """Indices grouped greedily, in ascending patch count, into batches of <= batch_patches patches.

    Ascending area keeps similar sizes together (less waste in the attention kernels); an image larger
    than the budget gets a batch of its own. The input order breaks ties, so the plan is deterministic.
    """
    if not isinstance(batch_patches, int) or batch_patches <= 0:
        raise ValueError(f"batch_patches must be a positive integer, got {batch_patches!r}")
    order = sorted(range(len(grids)), key=lambda i: (grids[i][0] * grids[i][1], i))
    batches: list[list[int]] = []
    used = 0
    for i in order:
        n = grids[i][0] * grids[i][1]
        if batches and used + n <= batch_patches:
            batches[-1].append(i)
            used += n
        else:
            batches.append([i])
            used = n
    return batches


# -------------------------------------------------------------------------------------- shards


def shard_name(index: int, n_shards: int) -> str:
    return f"codes-{index:05d}-of-{n_shards:05d}"


def _atomic_write(path: Path, write) -> None:
    # the pid keeps two ranks that write the same (identical) file from clobbering each other's tmp
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _code_type(codebook_size: int) -> pa.DataType:
    return pa.uint16() if codebook_size <= UINT16_MAX_CODEBOOK else pa.int32()


def _write_shard(path: Path, rows: list[tuple[str, tuple[int, int], np.ndarray]], code_type) -> None:
    rows = sorted(rows, key=lambda r: r[0])
    np_type = np.uint16 if code_type == pa.uint16() else np.int32
    flat = np.concatenate([r[2].astype(np_type) for r in rows]) if rows else np.zeros(0, np_type)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(r[2]) for r in rows])
    table = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            "h": pa.array([r[1][0] for r in rows], pa.int32()),
            "w": pa.array([r[1][1] for r in rows], pa.int32()),
            "codes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, code_type)),
        }
    )
    # dictionary encoding bit-packs the indices (e.g. 14 bits for a 15360-entry codebook), so a code
    # costs at most 2 bytes on disk even though Parquet has no 16-bit physical type
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", use_dictionary=True))


def _write_failures(path: Path, failures: list[tuple[str, str]]) -> None:
    text = "".join(json.dumps({"key": k, "reason": r}) + "\n" for k, r in sorted(failures))
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _try_decode(entry) -> tuple[str, tuple[int, int], torch.Tensor | None, str | None]:
    key, ref, settings, patch_size, grid = entry
    try:
        return key, grid, _decode(ref, settings, patch_size, grid), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return key, grid, None, str(err)


def _plan_shard(items, base: PreprocessConfig, patch_size: int, batch_patches: int, failures: list
                ) -> list[list[tuple]]:
    """Read each image's header for its grid (failures recorded) and group the readable ones."""
    ok = []
    for key, ref in items:
        settings = image_settings(ref, base, patch_size)
        try:
            ok.append((key, ref, settings, patch_size, _grid_from_header(ref, settings, patch_size)))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            failures.append((key, f"cannot read image {str(ref.path)!r}: {err}"))
    return [[ok[i] for i in b] for b in plan_batches([e[-1] for e in ok], batch_patches)]


def _decoded_batches(batches, pool: ThreadPoolExecutor, failures: list) -> Iterator[tuple[list, int]]:
    """(decoded images, batch size) in plan order; the next batch decodes on worker threads while one
    is encoded. Images that fail to decode go to ``failures``."""
    pending: list[list] = []
    for i in range(len(batches) + 1):
        if i < len(batches):
            pending.append([pool.submit(_try_decode, e) for e in batches[i]])
        if pending and (len(pending) > 1 or i == len(batches)):
            done = [f.result() for f in pending.pop(0)]
            failures.extend((key, reason) for key, _, x, reason in done if x is None)
            yield [(key, grid, x) for key, grid, x, _ in done if x is not None], len(done)


def _encode_shard(tok: ViQTokenizer, items, base, batch_patches, pool, pbar) -> tuple[list, list]:
    failures: list[tuple[str, str]] = []
    rows: list[tuple[str, tuple[int, int], np.ndarray]] = []
    batches = _plan_shard(items, base, tok.cfg.encoder.patch_size, batch_patches, failures)
    pbar.update(len(failures))
    for batch, n in _decoded_batches(batches, pool, failures):
        if batch:
            codes = tok.encode([x for _, _, x in batch])  # one packed forward for the whole batch
            for (key, grid, _), c in zip(batch, codes, strict=True):
                assert tuple(c.grid) == tuple(grid), (key, c.grid, grid)
                rows.append((key, tuple(grid), c.indices.cpu().numpy()))
        pbar.update(n)
    return rows, failures


# ---------------------------------------------------------------------------------- extraction


def _settings(tok: ViQTokenizer, overrides: dict | None) -> PreprocessConfig:
    base = tok.cfg.preprocess
    fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    bad = sorted(set(overrides or {}) - fields)
    if bad:
        raise ValueError(f"unknown preprocess setting {bad[0]!r}; valid: {sorted(fields)}")
    return dataclasses.replace(base, **(overrides or {}))


def _check_plan(out: Path, plan: dict) -> None:
    path = out / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise ValueError(f"{out} holds another extraction (differs in {diff}); use a new directory")
        return
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(plan, indent=2) + "\n"))


def extract(
    tokenizer: str | os.PathLike | ViQTokenizer,
    dataset_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    batch_patches: int = 16384,
    shard_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    preprocess: dict | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> dict | None:
    """Encode this rank's shards (skipping finished ones); see the module docstring.

    ``preprocess`` overrides fields of the tokenizer's PreprocessConfig (mode, area, multiple, ...).
    Returns the manifest once every shard exists (this process then writes it), else None: another
    rank still works, and whichever finds all shards done writes the manifest.
    """
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    tok = load_viq(tokenizer)
    identity = tokenizer_identity(tok)  # before any dtype change: the identity is of the weights as saved
    base = _settings(tok, preprocess)
    if device is not None or dtype is not None:
        tok = tok.to(device=device, dtype=dtype)
    tok.eval()
    items, n_samples = collect_images(dataset_path, image_root)
    plan = _plan(tok, identity, base, items, batch_patches, shard_size)
    n_shards = plan["n_shards"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, plan)
    mine = [s for s in range(rank, n_shards, world_size) if not (out / f"{shard_name(s, n_shards)}.parquet").is_file()]
    todo = sum(len(items[s * shard_size : (s + 1) * shard_size]) for s in mine)
    logger.info("rank %d/%d: %d of %d shards to encode (%d images)", rank, world_size, len(mine), n_shards, todo)
    code_type = _code_type(tok.codebook_size)
    with (
        ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool,
        tqdm(total=todo, desc=f"extract[{rank}]", unit="img", disable=not progress) as pbar,
    ):
        for s in mine:
            rows, failures = _encode_shard(
                tok, items[s * shard_size : (s + 1) * shard_size], base, batch_patches, pool, pbar
            )
            _save_shard(out, shard_name(s, n_shards), rows, failures, code_type)
    return finalize(out, plan, dataset_path, n_samples, dict(items))


def _plan(tok: ViQTokenizer, identity: dict, base, items: list, batch_patches: int, shard_size: int) -> dict:
    """What a run's shards depend on; a rerun into the same directory must agree with it (_check_plan)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": identity,
        "codebook_size": tok.codebook_size,
        "codes_per_patch": tok.codes_per_patch,
        "patch_size": tok.cfg.encoder.patch_size,
        "code_dtype": str(_code_type(tok.codebook_size)),
        "compute_dtype": str(tok.encoder.pos_embed.dtype),
        "preprocess": to_dict(base),
        "batch_patches": batch_patches,
        "shard_size": shard_size,
        "n_shards": math.ceil(len(items) / shard_size),
        "n_images": len(items),
        "keys_sha256": sha256_json([k for k, _ in items]),
    }


def _save_shard(out: Path, name: str, rows, failures, code_type) -> None:
    for stale in out.glob(f".{name}.*.tmp"):  # left by a killed run; this rank owns this shard
        stale.unlink(missing_ok=True)
    _write_failures(out / f"{name}.failures.jsonl", failures)  # before the shard: done means both
    _write_shard(out / f"{name}.parquet", rows, code_type)


def storage_report(out: Path, shards: list[dict], refs: dict[str, ImageRef], patch_size: int) -> dict:
    """Bytes per encoded image: the code shards on disk, the image as RGB at its encoded size, and its source
    file; the ratios check the paper's "1/96 of the raw size" (4 uint16 codes per 16x16x3-byte patch)."""
    keys, raw = [], 0
    for shard in shards:
        table = pq.read_table(out / shard["file"], columns=["key", "h", "w"])
        keys += table.column("key").to_pylist()
        raw += int((table.column("h").to_numpy().astype(np.int64) * table.column("w").to_numpy()).sum())
    n = max(len(keys), 1)
    codes = sum(s["bytes"] for s in shards)
    source = sum(Path(refs[k].path).stat().st_size for k in keys if k in refs and Path(refs[k].path).is_file())
    raw *= patch_size * patch_size * 3
    return {"code_bytes_per_image": codes / n, "raw_rgb_bytes_per_image": raw / n,
            "source_file_bytes_per_image": source / n,
            "codes_over_raw_rgb": codes / raw if raw else None, "codes_over_source": codes / source if source else None}


def finalize(out: Path, plan: dict, dataset_path, n_samples: int, refs: dict[str, ImageRef]) -> dict | None:
    """Write failures.jsonl and manifest.json if every shard exists; return the manifest (or None)."""
    n = plan["n_shards"]
    names = [shard_name(s, n) for s in range(n)]
    if not all((out / f"{name}.parquet").is_file() for name in names):
        return None
    shards, failures = [], []
    for name in names:
        path = out / f"{name}.parquet"
        shard_failures = [json.loads(line) for line in (out / f"{name}.failures.jsonl").read_text().splitlines()]
        failures += shard_failures
        rows = pq.ParquetFile(path).metadata.num_rows
        shards.append(
            {
                "file": path.name,
                "rows": rows,
                "failures": len(shard_failures),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    n_rows = sum(s["rows"] for s in shards)
    manifest = {
        **plan,
        "dataset": str(dataset_path),
        "counts": {
            "samples": n_samples,
            "images": plan["n_images"],
            "encoded": n_rows,
            "failed": len(failures),
            "shards": n,
        },
        "shards": shards,
        "storage": storage_report(out, shards, refs, plan["patch_size"]),
    }
    text = "".join(json.dumps(f) + "\n" for f in sorted(failures, key=lambda f: f["key"]))
    _atomic_write(out / "failures.jsonl", lambda tmp: tmp.write_text(text))
    _atomic_write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    if failures:
        logger.warning(
            "%d of %d images could not be read; see %s",
            len(failures),
            plan["n_images"],
            out / "failures.jsonl",
        )
    return manifest


# ----------------------------------------------------------------------------------------- CLI

MAX_FAIL_FRACTION = 0.1


def extraction_problem(manifest: dict, max_fail_fraction: float = MAX_FAIL_FRACTION) -> str | None:
    """Why a finished extraction is not usable: no image encoded, or more than ``max_fail_fraction`` of
    them failed; None when it is."""
    c = manifest["counts"]
    if c["encoded"] == 0:
        return f"no image could be extracted ({c['failed']} of {c['images']} failed)"
    if c["failed"] > max_fail_fraction * c["images"]:
        return (f"{c['failed']} of {c['images']} images failed ({c['failed'] / c['images']:.1%}), more than "
                f"max_fail_fraction={max_fail_fraction}")
    return None


def _max_fail_fraction(overrides: dict) -> float:
    value = overrides.pop("max_fail_fraction", MAX_FAIL_FRACTION)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"max_fail_fraction must be a number in [0, 1], got {value!r}")
    return float(value)


def _parse_overrides(items: list[str]) -> dict:
    from viq.configio import parse_override

    out = {}
    for item in items:
        keys, value = parse_override(item)
        if keys[0] == "preprocess":
            keys = keys[1:]
        if len(keys) != 1:
            raise ValueError(f"override {item!r}: expected a preprocess field such as area=589824")
        out[keys[0]] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """``viq extract TOKENIZER DATASET --out DIR [key=value ...]``; RANK/WORLD_SIZE from the launcher."""
    parser = argparse.ArgumentParser(
        prog="viq extract",
        description="Encode every image a data set references into ViQ code shards (Parquet) and a "
        "manifest. Resumable: run it again to finish a killed run. Multi-process under torchrun "
        "or deepspeed: each rank takes a disjoint set of shards.",
    )
    parser.add_argument("tokenizer", help="a saved ViQ tokenizer directory, or a preset name")
    parser.add_argument("dataset", help="annotations (.json, .jsonl, .parquet, .tar, or a data set directory)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image-root", default=None, help="folder relative image paths resolve against")
    parser.add_argument("--batch-patches", type=int, default=16384, help="patches per encoder forward")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    parser.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="preprocessing overrides, e.g. area=589824 multiple=32; and "
                        f"max_fail_fraction=F: exit 1 when more than F of the images fail ({MAX_FAIL_FRACTION})")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    overrides = _parse_overrides(args.overrides)
    max_fail_fraction = _max_fail_fraction(overrides)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    manifest = extract(
        args.tokenizer,
        args.dataset,
        args.out,
        image_root=args.image_root,
        batch_patches=args.batch_patches,
        shard_size=args.shard_size,
        rank=rank,
        world_size=world,
        preprocess=overrides,
        device=device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    return 0 if manifest is None else _report(manifest, Path(args.out), max_fail_fraction)


def _report(manifest: dict, out: Path, max_fail_fraction: float) -> int:
    """Log the counts of a finished extraction; its exit code."""
    c = manifest["counts"]
    logger.info("extracted %d of %d images into %d shards (%d failed)", c["encoded"], c["images"], c["shards"],
                c["failed"])
    problem = extraction_problem(manifest, max_fail_fraction)
    if problem is None:
        return 0
    logger.error("viq extract: %s; each failure is listed in %s", problem, out / "failures.jsonl")
    return 1
