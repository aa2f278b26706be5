import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pytest

from mllm.data.readers import ImageRef, Sample, parse_resize, read_samples

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
TURNS = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}]
TEXT_CONV = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]


def llava_records():
    return [
        {"id": "a", "image": "img/a.png", "conversations": CONV, "question_type": "colour"},
        {"id": "b", "image": None, "conversations": TEXT_CONV, "question_type": "text"},
        {"id": "c", "image": "img/c.png", "conversations": CONV, "question_type": "colour"},
    ]


def expected_llava(root):
    return [
        Sample("a", TURNS, [ImageRef(root / "img/a.png")], {"question_type": "colour"}),
        Sample(
            "b",
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
            [],
            {"question_type": "text"},
        ),
        Sample("c", TURNS, [ImageRef(root / "img/c.png")], {"question_type": "colour"}),
    ]


def test_llava_json(tmp_path):
    path = tmp_path / "data.json"
    recs = llava_records()
    recs[1] = {k: v for k, v in recs[1].items() if k != "image"}  # missing key == text-only
    recs.append({"id": 7, "image": ["img/x.png", "/abs/y.png"], "conversations": CONV + CONV})
    path.write_text(json.dumps(recs))
    samples = list(read_samples(path))
    assert samples[:3] == expected_llava(tmp_path)
    assert samples[3].id == "7"
    assert samples[3].images == [ImageRef(tmp_path / "img/x.png"), ImageRef(Path("/abs/y.png"))]
    other_root = list(read_samples(path, image_root=tmp_path / "elsewhere"))
    assert other_root[0].images == [ImageRef(tmp_path / "elsewhere/img/a.png")]


def test_viq_json(tmp_path):
    recs = [
        {"id": "v1", "image": {"img_path": "a.png", "resize": "384x32"}, "conversations": CONV},
        {
            "id": "v2",
            "image": [{"img_path": "a.png", "resize": "256x16"}, {"img_path": "b.png"}],
            "conversations": CONV + CONV,
        },
    ]
    (tmp_path / "viq.json").write_text(json.dumps(recs))
    s1, s2 = read_samples(tmp_path / "viq.json")
    assert s1.images == [ImageRef(tmp_path / "a.png", resize=384 * 384, multiple=32)]
    assert s2.images == [ImageRef(tmp_path / "a.png", 256 * 256, 16), ImageRef(tmp_path / "b.png")]
    assert s1.turns == TURNS


def test_parse_resize():
    assert parse_resize("384x32") == (147456, 32)
    for bad in ("384", "x32", "0x32", 384, "384x-1"):
        with pytest.raises(ValueError, match="resize"):
            parse_resize(bad)


def test_jsonl_skips_bad_lines(tmp_path):
    lines = [json.dumps(r) for r in llava_records()]
    lines.insert(1, "{not json")
    lines.insert(3, "[1, 2]")
    lines.append(json.dumps({"id": "bad", "image": {"resize": "384x32"}, "conversations": CONV}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    skipped = Counter()
    assert list(read_samples(tmp_path / "data.jsonl", skipped=skipped)) == expected_llava(tmp_path)
    assert skipped == {"malformed JSON": 1, "wrong type": 1, "bad image entry": 1}


def test_hf_save_to_disk_and_parquet(tmp_path):
    ds = datasets.Dataset.from_list(llava_records())
    ds.save_to_disk(str(tmp_path / "hf"))
    assert list(read_samples(tmp_path / "hf", image_root=tmp_path)) == expected_llava(tmp_path)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfdict"))
    assert list(read_samples(tmp_path / "hfdict", image_root=tmp_path)) == expected_llava(tmp_path)
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    assert list(read_samples(tmp_path / "pq" / "part-0.parquet", image_root=tmp_path)) == expected_llava(
        tmp_path
    )
    assert list(read_samples(tmp_path / "pq", image_root=tmp_path)) == expected_llava(tmp_path)


def test_hf_viq_columns(tmp_path):
    recs = [
        {"id": "v1", "image": {"img_path": "a.png", "resize": "384x32"}, "conversations": CONV},
        {"id": "v2", "image": {"img_path": "b.png", "resize": None}, "conversations": CONV},
    ]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))
    s1, s2 = read_samples(tmp_path / "hf", image_root=tmp_path)
    assert s1.images == [ImageRef(tmp_path / "a.png", 384 * 384, 32)]
    assert s2.images == [ImageRef(tmp_path / "b.png")]


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset(tmp_path, make_image):
    png = make_image("src.png", 40, 30).read_bytes()
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for rec in llava_records():
            body = {k: v for k, v in rec.items() if k != "image"}
            _add(tar, f"{rec['id']}.json", json.dumps(body).encode())
            if rec["image"]:
                _add(tar, f"{rec['id']}.png", png)
        _add(tar, "orphan.png", png)  # an image without its record
    cache = tmp_path / "cache"
    skipped = Counter()
    samples = list(read_samples(tmp_path / "shard.tar", image_root=cache, skipped=skipped))
    expected = expected_llava(cache)
    assert samples == [
        Sample(e.id, e.turns, [ImageRef(cache / f"{e.id}.png")] if e.images else [], e.meta) for e in expected
    ]
    assert (cache / "a.png").read_bytes() == png
    assert skipped == {"bad record": 1}
    # the default cache sits next to the tar
    assert (
        next(iter(read_samples(tmp_path / "shard.tar"))).images[0].path == tmp_path / "shard_images" / "a.png"
    )


def test_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match="no data file"):
        read_samples(tmp_path / "nope.json")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_samples(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        read_samples(tmp_path / "empty")
