"""Offline code extraction: determinism, resumption, multi-rank, storage type, failures, CodeStore checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mllm.data.codes import CodeStore, tokenizer_identity
from mllm.tools.extract import _code_type, _write_shard, extract, main, plan_batches
from viq.tokenizer import ViQTokenizer

CONV = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A test."}]


def lively_tokenizer(seed: int = 0) -> ViQTokenizer:
    """The debug preset, with the code projection scaled so random weights give varied codes (a fresh
    random head maps everything to the centre of the FSQ grid, which would make equality tests vacuous)."""
    tok = ViQTokenizer.from_preset("debug", seed=seed)
    with torch.no_grad():
        tok.head.project_in.weight.mul_(200.0)
    return tok


def write_dataset(root: Path, n: int = 7, corrupt: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(48, 200, size=2))
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
        records.append({"id": f"s{i}", "image": f"{sub.name}/img{i}.png", "conversations": CONV})
    # the same image twice: it is extracted once
    records.append({"id": "dup", "image": "b/img0.png", "conversations": CONV})
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        records.append({"id": "bad", "image": "broken.png", "conversations": CONV})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tok():
    return lively_tokenizer()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("extract")
    data = write_dataset(root / "data")
    out = root / "codes"
    manifest = extract(tok, data, out, shard_size=3, batch_patches=160, progress=False)
    return data, out, manifest


def test_manifest_counts_and_storage_type(extracted, tok):
    _, out, manifest = extracted
    assert manifest["counts"] == {"samples": 9, "images": 8, "encoded": 7, "failed": 1, "shards": 3}
    assert manifest["tokenizer"] == tokenizer_identity(tok)
    assert manifest["codebook_size"] == tok.codebook_size and manifest["codes_per_patch"] == 4
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        assert table.schema.field("codes").type == pa.list_(pa.uint16())
        assert table.schema.field("h").type == pa.int32() and table.schema.field("w").type == pa.int32()
        keys = table.column("key").to_pylist()
        assert keys == sorted(keys) and len(keys) == shard["rows"]


def test_shards_cost_at_most_two_bytes_per_code(tmp_path):
    # ViQ-16k's codebook (15360 entries): random codes, the worst case for compression
    rng = np.random.default_rng(0)
    rows = [(f"img{i:03d}", (24, 24), rng.integers(0, 15360, 24 * 24 * 4)) for i in range(150)]
    path = tmp_path / "shard.parquet"
    _write_shard(path, rows, _code_type(15360))
    n_codes = sum(len(r[2]) for r in rows)
    meta = pq.ParquetFile(path).metadata
    codes_col = [meta.schema.column(i).path for i in range(meta.num_columns)].index("codes.list.element")
    codes_bytes = sum(meta.row_group(g).column(codes_col).total_compressed_size for g in range(meta.num_row_groups))
    assert codes_bytes <= 2 * n_codes
    assert path.stat().st_size <= 2 * n_codes + 8 * len(rows) + 4096  # grids and keys: a few bytes per image
    assert _code_type(65536) == pa.uint16() and _code_type(65537) == pa.int32()


def test_codes_read_back_equal_encode(extracted, tok):
    data, out, _ = extracted
    store = CodeStore(out, expected_tokenizer=tok)
    assert len(store) == 7 and "broken.png" not in store
    for key in ("a/img1.png", "b/img4.png"):
        want = tok.encode([Image.open(data.parent / key)])[0]
        codes, grid = store[key]
        assert grid == want.grid and codes.dtype == torch.int64
        assert torch.equal(codes, want.indices)
    assert len(torch.unique(store["a/img1.png"][0])) > 10  # the check above is not vacuous


def test_failures_file_names_the_corrupt_image(extracted):
    _, out, _ = extracted
    lines = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["key"] for f in lines] == ["broken.png"]
    assert "cannot read image" in lines[0]["reason"]


def test_resume_after_a_lost_shard_is_byte_identical(extracted, tok, tmp_path):
    data, out, _ = extracted
    want = digests(out)
    copy = tmp_path / "codes"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    # a run killed during shard 1: its files and the final files are missing, a temporary file is left
    for name in ("codes-00001-of-00003.parquet", "codes-00001-of-00003.failures.jsonl", "manifest.json"):
        (copy / name).unlink()
    (copy / ".codes-00001-of-00003.parquet.999.tmp").write_bytes(b"half a shard")
    before = {n: (copy / n).stat().st_mtime_ns for n in ("codes-00000-of-00003.parquet",)}
    extract(tok, data, copy, shard_size=3, batch_patches=160, progress=False)
    assert digests(copy) == want
    assert (copy / "codes-00000-of-00003.parquet").stat().st_mtime_ns == before["codes-00000-of-00003.parquet"]


def test_two_ranks_give_the_same_files(extracted, tok, tmp_path):
    data, out, _ = extracted
    assert extract(tok, data, tmp_path, shard_size=3, batch_patches=160, rank=1, world_size=2, progress=False) is None
    assert not (tmp_path / "manifest.json").exists()  # rank 0's shards are still missing
    manifest = extract(tok, data, tmp_path, shard_size=3, batch_patches=160, rank=0, world_size=2, progress=False)
    assert manifest is not None and digests(tmp_path) == digests(out)


def test_other_settings_into_the_same_directory_are_refused(extracted, tok):
    data, out, _ = extracted
    with pytest.raises(ValueError, match="another extraction"):
        extract(tok, data, out, shard_size=3, batch_patches=160, preprocess={"area": 96 * 96}, progress=False)
    with pytest.raises(ValueError, match="unknown preprocess setting 'size'"):
        extract(tok, data, out, preprocess={"size": 3}, progress=False)


def test_codestore_rejects_another_tokenizer(extracted):
    _, out, manifest = extracted
    other = lively_tokenizer(seed=1)
    with pytest.raises(ValueError) as err:
        CodeStore(out, expected_tokenizer=other)
    msg = str(err.value)
    assert manifest["tokenizer"]["weights_sha256"][:12] in msg
    assert tokenizer_identity(other)["weights_sha256"][:12] in msg


def test_codestore_missing_key_and_bad_checksum(extracted, tmp_path):
    _, out, manifest = extracted
    with pytest.raises(KeyError, match="nope.png"):
        CodeStore(out)["nope.png"]
    for p in out.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    shard = tmp_path / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-9] + b"corrupted")
    with pytest.raises(ValueError, match="bad checksum"):
        CodeStore(tmp_path)


def test_plan_batches_respects_the_budget():
    grids = [(8, 8), (2, 2), (4, 4), (16, 16), (4, 4)]
    batches = plan_batches(grids, 100)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert batches == [[1, 2, 4, 0], [3]]  # ascending area, ties by index; the big one alone
    with pytest.raises(ValueError, match="batch_patches"):
        plan_batches(grids, 0)


def test_cli_entry_point(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", n=2, corrupt=False)
    tok_dir = tmp_path / "tok"
    lively_tokenizer().save_pretrained(tok_dir)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([str(tok_dir), str(data), "--out", str(tmp_path / "out"), "--no-progress", "area=9216"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["preprocess"]["area"] == 9216 and manifest["counts"]["encoded"] == 2


# --- issue 13: an extraction that failed says so, and bad inputs are failures, not codes ---------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok") / "tok"
    tok.save_pretrained(path)
    return path


def run_cli(tok_dir, data, out, *extra) -> int:
    return main([str(tok_dir), str(data), "--out", str(out), "--no-progress", "--workers", "1", *extra])


def failed_keys(out: Path) -> list[str]:
    return [json.loads(line)["key"] for line in (out / "failures.jsonl").read_text().splitlines()]


def test_an_extraction_where_every_image_fails_exits_nonzero(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    data = write_dataset(tmp_path / "data", n=2, corrupt=True)
    for png in (tmp_path / "data").rglob("img*.png"):
        png.write_bytes(b"not an image")
    assert run_cli(tok_dir, data, tmp_path / "out") == 1
    assert failed_keys(tmp_path / "out") == ["a/img1.png", "b/img0.png", "broken.png"]


def test_more_failures_than_the_allowed_fraction_exit_nonzero(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    data = write_dataset(tmp_path / "data", n=2, corrupt=True)  # 1 of 3 images fails
    out = tmp_path / "out"
    assert run_cli(tok_dir, data, out) == 1  # the default allows 10%
    assert failed_keys(out) == ["broken.png"]
    assert run_cli(tok_dir, data, out, "max_fail_fraction=0.5") == 0  # the finished shards are reused
    assert failed_keys(out) == ["broken.png"]
    with pytest.raises(ValueError, match="max_fail_fraction"):
        run_cli(tok_dir, data, out, "max_fail_fraction=2")


def test_png_with_corrupt_data_is_a_failure_not_codes(tmp_path, tok):
    from bad_files import silently_corrupt_png

    data = write_dataset(tmp_path / "data", n=2, corrupt=False)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "data" / "b" / "img0.png")
    silently_corrupt_png(tmp_path / "data" / "b" / "img0.png")
    manifest = extract(tok, data, tmp_path / "out", progress=False, num_workers=1)
    assert manifest["counts"]["encoded"] == 1 and failed_keys(tmp_path / "out") == ["b/img0.png"]
    assert "b/img0.png" not in CodeStore(tmp_path / "out")


def test_a_webdataset_tar_given_by_a_relative_path(tmp_path, tok, monkeypatch):
    import io
    import tarfile

    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    with tarfile.open("data/shard.tar", "w") as tar:
        for i in range(3):
            for name, body in ((f"k{i}.json", json.dumps({"conversations": CONV}).encode()),
                               (f"k{i}.png", _png_bytes(40 + 8 * i))):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    manifest = extract(tok, "data/shard.tar", "out", progress=False, num_workers=1)
    assert manifest["counts"]["encoded"] == 3 and manifest["counts"]["failed"] == 0
    assert sorted(CodeStore("out").keys()) == ["k0.png", "k1.png", "k2.png"]


def _png_bytes(size: int) -> bytes:
    import io

    buf = io.BytesIO()
    rng = np.random.default_rng(size)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_manifest_reports_storage_per_image(tmp_path):
    # the paper's 1/96: 4 two-byte codes per 16x16 patch of 3-byte pixels; Parquet's compression moves it
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"im{i}.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": str(i), "image": f"im{i}.png", "conversations": CONV} for i in range(3)]))
    manifest = extract(ViQTokenizer.from_preset("debug"), data, tmp_path / "codes", preprocess={"area": 4096},
                       progress=False)
    st = manifest["storage"]
    assert st["raw_rgb_bytes_per_image"] == 64 * 64 * 3
    assert st["source_file_bytes_per_image"] == sum((tmp_path / f"im{i}.png").stat().st_size for i in range(3)) / 3
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    assert st["code_bytes_per_image"] == shard_bytes / 3
    assert st["codes_over_raw_rgb"] == pytest.approx(shard_bytes / (3 * 64 * 64 * 3))
