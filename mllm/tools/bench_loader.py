"""The data path of training from codes, timed: code shards (mllm.data.codes.CodeStore) -> CodesDataset ->
PackedDataset -> collate_packed, the path `viq train` with ``data.codes`` runs, on synthetic shards with a
bench cell's sample mix and image grids. Reports samples/s and packed rows/s, in this process and through
a torch DataLoader with workers, so that ``viq bench`` can set the time to build one row beside the step.

The shards are written in the extraction format (mllm.tools.extract's layout) from random codes, and the
annotations hold one LLaVA-style conversation per sample whose text has about the sample's token counts;
no image file exists or is opened (CodesDataset takes the grids from the store).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mllm.data.codes import FORMAT, FORMAT_VERSION, UINT16_MAX_CODEBOOK, CodeStore, codes_dataset, sha256_file
from mllm.data.layout import IMAGE_TOKEN
from mllm.data.packing import PackedDataset, collate_packed
from mllm.model.text_tokenizer import build_tokenizer
from mllm.tools import bench_steps as steps
from viq.config import PreprocessConfig
from viq.configio import to_dict

# words of one or two debug-tokenizer tokens, for text of about the wanted token length
WORDS = ("the", "image", "shows", "a", "red", "circle", "on", "left", "what", "colour", "is", "it", "blue")


def write_synthetic_codes(root: Path, samples, *, codebook: int, codes_per_patch: int, patch: int,
                          seed: int = 0) -> tuple[Path, Path]:
    """Annotations ``root/train.json`` and a one-shard extraction ``root/codes`` for ``samples``
    (bench_steps.SynthSample); returns both paths."""
    rng = np.random.default_rng(seed)
    records, keys, grids, codes = [], [], [], []
    for i, s in enumerate(samples):
        prompt = " ".join(rng.choice(WORDS, max(1, s.prompt)))
        answer = " ".join(rng.choice(WORDS, max(1, s.answer)))
        rec = {"id": f"s{i:06d}", "conversations": [{"from": "human", "value": prompt},
                                                      {"from": "gpt", "value": answer}]}
        if s.grid:
            key = f"images/{i:06d}.png"
            rec["image"] = key
            rec["conversations"][0]["value"] = f"{IMAGE_TOKEN}\n{prompt}"
            keys.append(key)
            grids.append(s.grid)
            codes.append(rng.integers(0, codebook, s.grid[0] * s.grid[1] * codes_per_patch))
        records.append(rec)
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(records))
    out = root / "codes"
    out.mkdir(exist_ok=True)
    order = np.argsort(keys)  # shards hold their rows sorted by key, as the extraction writes them
    code_type = pa.uint16() if codebook <= UINT16_MAX_CODEBOOK else pa.int32()
    offsets = np.concatenate([[0], np.cumsum([len(codes[i]) for i in order])]).astype(np.int32)
    table = pa.table({
        "key": pa.array([keys[i] for i in order], pa.string()),
        "h": pa.array([grids[i][0] for i in order], pa.int32()),
        "w": pa.array([grids[i][1] for i in order], pa.int32()),
        "codes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([codes[i] for i in order])
                                                                     .astype(np.uint16), code_type)),
    })
    shard = out / "codes-00000-of-00001.parquet"
    pq.write_table(table, shard, compression="zstd", use_dictionary=True)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tokenizer": {"name": "synthetic"}, "preprocess": to_dict(PreprocessConfig()),
        "patch_size": patch, "codes_per_patch": codes_per_patch, "codebook_size": codebook,
        "shards": [{"file": shard.name, "rows": len(keys), "sha256": sha256_file(shard)}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root / "train.json", out


def _drain(loader) -> tuple[int, int, float]:
    """(samples, rows, seconds) of one pass over ``loader`` after its first row: starting worker processes
    is not counted (a training run starts them once)."""
    it = iter(loader)
    next(it)
    samples, rows = 0, 0
    t0 = time.perf_counter()
    for batch in it:
        samples += len(batch["cu_seq_lens"]) - 1
        rows += 1
    return samples, rows, time.perf_counter() - t0


def measure_loader(mix, seq_len: int, *, rows: int = 8, workers: int = 2, codebook: int = 1 << 16,
                   codes_per_patch: int = 4, patch: int = 16, seed: int = 0, tokenizer=None) -> dict:
    """Throughput of the code-shard data path for ``rows`` packed rows of ``seq_len`` tokens drawn from
    ``mix`` (a bench SampleMixConfig): samples/s and seconds per packed row, in this process (``single``)
    and through a DataLoader with ``workers`` processes (``workers``; None when workers is 0)."""
    if rows < 2:
        raise ValueError(f"loader rows must be >= 2 (the first row is not timed), got {rows}")
    rng = np.random.default_rng(seed)
    samples = [s for _ in range(rows) for s in steps.synth_samples(mix, seq_len, rng)]
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="viq-bench-loader-") as tmp:
        data, codes = write_synthetic_codes(Path(tmp), samples, codebook=codebook,
                                            codes_per_patch=codes_per_patch, patch=patch, seed=seed)
        t0 = time.perf_counter()
        store = CodeStore(codes)
        ds = codes_dataset(data, tokenizer, store, max_seq_len=seq_len)
        packed = PackedDataset(ds, seq_len, seed=seed)
        prepare_s = time.perf_counter() - t0
        out = {"seq_len": seq_len, "samples": len(ds), "rows": len(packed), "prepare_s": prepare_s,
               "workers_count": workers}
        runs = {"single": 0} | ({"workers": workers} if workers else {})
        for name, n in runs.items():
            loader = torch.utils.data.DataLoader(packed, batch_size=1, num_workers=n, collate_fn=collate_packed)
            got, got_rows, dt = _drain(loader)
            out[name] = {"samples_per_s": got / dt if dt else None, "row_s": dt / got_rows if got_rows else None}
        out.setdefault("workers", None)
    return out
