"""Fault injection on the input side (issue 13): each kind of input file, corrupted, gives either a named
error (the whole file is unusable) or a counted skip whose log line names the file and the record.

Issue cases shown here: 5 (bad text records), 6 (relative paths, webdataset) and 8 (corrupt PNG data
behind an intact header); `viq extract`'s side of 6-8 is in tests/mllm/tools/test_extract.py.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_files import silently_corrupt_png, truncate
from mllm_helpers import RECIPES, debug_overrides
from PIL import Image

from mllm.data.chat import ConversationError, render_conversation
from mllm.data.codes import FORMAT, FORMAT_VERSION, CodeStore, sha256_file
from mllm.data.dataset import SupervisedDataset, skip_summary
from mllm.data.readers import ImageRef, Sample, read_samples
from viq.config import PreprocessConfig

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
TEXT = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]


@pytest.fixture
def logged():
    """Everything mllm.data logs during the test, as one string (the mllm loggers may not propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("mllm.data")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)
    logger.setLevel(level)


def make_ds(samples, tok, **kw):
    kw.setdefault("image", PreprocessConfig(area=64 * 64))
    return SupervisedDataset(samples, tok, patch_size=16, **kw)


def image_sample(sid, path, question="<image>\nWhat colour?", answer="red"):
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Sample(sid, turns, [ImageRef(Path(path))])


def text_line(sid: str, conv=TEXT) -> bytes:
    return json.dumps({"id": sid, "conversations": conv}).encode()


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def noise_png(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- case 5: one bad text record ------------------------------------------------------------------


def test_undecodable_jsonl_line_is_a_named_skip(tmp_path, logged):
    path = write_lines(tmp_path / "data.jsonl", [text_line("a"), b'{"id": "b", "x": "caf\xe9"}', text_line("c")])
    skipped = Counter()
    assert [s.id for s in read_samples(path, skipped=skipped)] == ["a", "c"]
    assert skipped == {"undecodable bytes": 1}
    assert f"{path} line 2" in logged()
    with pytest.raises(ValueError, match=r"data\.jsonl line 2.*undecodable bytes"):
        list(read_samples(path, strict=True))


def test_malformed_jsonl_line_fails_fast_under_strict(tmp_path, logged):
    path = write_lines(tmp_path / "data.jsonl", [text_line("a"), b'{"id": "b", ', text_line("c")])
    skipped = Counter()
    assert [s.id for s in read_samples(path, skipped=skipped)] == ["a", "c"]
    assert skipped == {"malformed JSON": 1} and f"{path} line 2" in logged()
    with pytest.raises(ValueError, match=r"data\.jsonl line 2.*malformed JSON"):
        list(read_samples(path, strict=True))


def _write_format(fmt: str, path: Path, records: list[dict]) -> Path:
    if fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(records))
    elif fmt == "jsonl":
        path = write_lines(path.with_suffix(".jsonl"), [json.dumps(r).encode() for r in records])
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "hf"])
def test_wrong_types_are_counted_and_named_by_every_reader(tmp_path, logged, fmt):
    records = [{"id": "a", "image": None, "conversations": TEXT}, {"id": "b", "image": 7, "conversations": TEXT},
               {"id": "c", "image": None, "conversations": TEXT}]
    path = _write_format(fmt, tmp_path / "data", records)
    skipped = Counter()
    assert [s.id for s in read_samples(path, skipped=skipped)] == ["a", "c"]
    where = "line 2" if fmt == "jsonl" else "record 1"
    assert skipped == {"wrong type": 1} and f"{path} {where}" in logged()
    with pytest.raises(ValueError, match=f"{where}.*wrong type.*got 7"):
        list(read_samples(path, strict=True))


def test_malformed_json_file_names_the_file_and_position(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "a", "conversations": []},\n {"id": }]')
    with pytest.raises(ValueError, match=r"data\.json.*line 2 column 9"):
        list(read_samples(path))
    path.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"data\.json.*position 12"):
        list(read_samples(path))


def test_corrupt_parquet_annotations_are_a_named_error(tmp_path):
    path = _write_format("parquet", tmp_path / "data", [{"id": "a", "conversations": TEXT}] * 20)
    truncate(path)
    with pytest.raises(ValueError, match=r"data\.parquet"):
        list(read_samples(path))


def test_lone_surrogate_is_a_counted_skip(tmp_path, tok):
    bad = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "half a pair: \ud800"}]
    path = write_lines(tmp_path / "data.jsonl", [text_line("a"), text_line("b", bad), text_line("c")])
    with pytest.raises(ConversationError) as err:
        render_conversation(next(s for s in read_samples(path) if s.id == "b").turns, tok)
    assert err.value.reason == "unencodable text" and "turn 1" in str(err.value)
    ds = make_ds(read_samples(path), tok)
    assert [r.id for r in ds.records] == ["a", "c"] and ds.skipped == {"unencodable text": 1}
    with pytest.raises(ValueError, match="'b'.*turn 1"):
        make_ds(read_samples(path), tok, strict=True)


# --- case 6: relative paths -----------------------------------------------------------------------


def _all_formats(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png_bytes())
    records = [{"id": "a", "image": "img/a.png", "conversations": CONV},
               {"id": "t", "image": None, "conversations": TEXT}]
    for fmt in ("json", "jsonl", "parquet", "hf"):
        _write_format(fmt, root / "data", records)
    with tarfile.open(root / "shard.tar", "w") as tar:
        for r in records:
            add_member(tar, f"{r['id']}.json", json.dumps({"conversations": r["conversations"]}).encode())
        add_member(tar, "a.png", png_bytes())


@pytest.mark.parametrize(("name", "image_root"), [("data.json", None), ("data.jsonl", None),
                                                  ("data.parquet", None), ("data", "in"), ("shard.tar", None),
                                                  ("shard.tar", "cache")])
def test_every_reader_works_from_a_relative_path(tmp_path, monkeypatch, tok, name, image_root):
    monkeypatch.chdir(tmp_path)
    _all_formats(Path("in"))
    skipped = Counter()
    samples = list(read_samples(f"in/{name}", image_root, skipped=skipped))
    assert [s.id for s in samples] == ["a", "t"] and not skipped
    assert samples[0].images[0].path.is_file(), samples[0].images[0].path
    ds = make_ds(samples, tok)
    assert len(ds) == 2 and not ds.skipped


# --- case 8 and images ----------------------------------------------------------------------------


def test_png_with_corrupt_data_behind_an_intact_header_is_a_counted_skip(tmp_path, make_image, tok, logged):
    bad = silently_corrupt_png(make_image("bad.png"))
    with Image.open(bad) as img:
        img.load()  # Pillow decodes it without a word, to other pixels: only the checksum tells
    samples = [image_sample("ok", make_image("good.png")), image_sample("bad", bad)]
    ds = make_ds(samples, tok)
    assert [r.id for r in ds.records] == ["ok"] and ds.skipped == {"corrupt image": 1}
    assert "bad.png" in logged()
    with pytest.raises(ValueError, match="'bad'.*bad.png"):
        make_ds(samples, tok, strict=True)


def test_truncated_png_is_a_counted_skip_at_preparation(tmp_path, make_image, tok):
    cut = truncate(noise_png(tmp_path / "cut.png"))
    ds = make_ds([image_sample("ok", make_image("good.png")), image_sample("cut", cut)], tok)
    assert [r.id for r in ds.records] == ["ok"] and ds.skipped == {"corrupt image": 1}


# --- all labels masked, and too many skips --------------------------------------------------------


def test_a_sample_with_every_label_masked_is_its_own_skip(tok, make_image):
    # a template that renders no assistant text: the label finder finds nothing to supervise
    mute = copy.deepcopy(tok)
    mute.chat_template = ("{%- for m in messages -%}{%- if m['role'] != 'assistant' -%}"
                          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                          "{%- endif -%}{%- endfor -%}")
    text = Sample("t", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(ValueError, match="all labels masked"):
        make_ds([text], mute)
    # an answer that truncation would cut away entirely
    img = make_image("a.png")
    wordy = image_sample("wordy", img, question="<image>" + " blue" * 60, answer="ok")
    full = make_ds([wordy], tok, max_seq_len=4096).lengths[0]
    ds = make_ds([image_sample("ok", img), wordy], tok, max_seq_len=full - 5)
    assert [r.id for r in ds.records] == ["ok"] and ds.skipped == {"all labels masked": 1}


def test_too_many_skips_stop_with_the_counts(tmp_path, tok):
    lines = [text_line(f"s{i}") for i in range(8)]
    lines += [b"{broken", text_line("mute", [{"from": "human", "value": "hi"}])]
    path = write_lines(tmp_path / "data.jsonl", lines)

    def build(fraction):
        skipped = Counter()
        return make_ds(read_samples(path, skipped=skipped), tok, skipped=skipped, max_skip_fraction=fraction)

    with pytest.raises(ValueError, match=r"2 of 10 samples") as err:
        build(0.1)
    assert "'malformed JSON': 1" in str(err.value) and "'no assistant turn': 1" in str(err.value)
    ds = build(0.2)
    assert skip_summary(ds) == {"kept": 8, "seen": 10, "truncated": 0,
                                "skipped": {"malformed JSON": 1, "no assistant turn": 1}}


def test_skip_counts_reach_the_run_summary(demo_data, tmp_path):
    from mllm.config import load_recipe
    from mllm.train.trainer import prepare_trainer

    records = json.loads(demo_data["train"].read_text())
    for r in records:
        if isinstance(r.get("image"), str):
            r["image"] = str(demo_data["train"].parent / r["image"])
    lines = [json.dumps(r).encode() for r in records] + [b"\xff not text", b"{broken"]
    data = write_lines(tmp_path / "train.jsonl", lines)
    cfg = load_recipe(RECIPES / "debug" / "sft_lora.yaml",
                      debug_overrides({"train": data}, tmp_path / "out", "train.max_steps=1"))
    prepare_trainer(cfg)
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["train"]["skipped"] == {"undecodable bytes": 1, "malformed JSON": 1}
    assert summary["train"]["seen"] == len(records) + 2 and summary["eval"] is None


# --- code shards and their manifest ---------------------------------------------------------------


def code_dir(root: Path) -> Path:
    root.mkdir()
    shard = root / "codes-00000-of-00001.parquet"
    pq.write_table(pa.table({"key": ["a.png"], "h": pa.array([2], pa.int32()), "w": pa.array([2], pa.int32()),
                             "codes": pa.array([[1, 2, 3, 4]], pa.list_(pa.uint16()))}), shard)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "patch_size": 16, "codes_per_patch": 1,
                "shards": [{"file": shard.name, "sha256": sha256_file(shard)}]}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def test_code_store_reads_the_hand_made_directory(tmp_path):
    codes, grid = CodeStore(code_dir(tmp_path / "codes"))["a.png"]
    assert codes.tolist() == [1, 2, 3, 4] and grid == (2, 2)


def test_truncated_code_shard_is_a_named_error(tmp_path):
    out = code_dir(tmp_path / "codes")
    truncate(out / "codes-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"codes-00000-of-00001\.parquet.*checksum"):
        CodeStore(out)
    with pytest.raises(ValueError, match=r"codes-00000-of-00001\.parquet.*(corrupt|Parquet)"):
        CodeStore(out, verify=False)
    (out / "codes-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"codes-00000-of-00001\.parquet.*missing"):
        CodeStore(out)


def test_malformed_code_manifest_is_a_named_error(tmp_path):
    out = code_dir(tmp_path / "codes")
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest\.json.*line \d+ column \d+"):
        CodeStore(out)
    manifest = json.loads(text)
    del manifest["shards"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json.*'shards'"):
        CodeStore(out)


# --- webdataset tars ------------------------------------------------------------------------------


def write_tar(path: Path, n: int = 3) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            add_member(tar, f"k{i}.json", json.dumps({"conversations": CONV}).encode())
            add_member(tar, f"k{i}.png", png_bytes())
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("where", ["inside a member's data", "inside a header", "between members"])
def test_truncated_tar_is_a_named_error(tmp_path, where):
    path = tmp_path / "shard.tar"
    members = write_tar(path)
    cut = {"inside a member's data": members[3].offset_data + 10, "inside a header": members[4].offset + 100,
           "between members": members[4].offset}[where]
    assert len(list(read_samples(path, tmp_path / "ok"))) == 3
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"shard\.tar.*truncated"):
        list(read_samples(path, tmp_path / "cache"))


def test_bad_tar_records_are_counted_and_named(tmp_path, logged):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.json", json.dumps({"conversations": TEXT}).encode())
        add_member(tar, "b.json", b'{"conversations": "caf\xe9"}')
        add_member(tar, "c.json", b'{"conversations": ')
    skipped = Counter()
    assert [s.id for s in read_samples(path, skipped=skipped)] == ["a"]
    assert skipped == {"undecodable bytes": 1, "malformed JSON": 1}
    assert "key 'b'" in logged() and "key 'c'" in logged()
    with pytest.raises(ValueError, match=r"shard\.tar key 'b'.*undecodable bytes"):
        list(read_samples(path, strict=True))
