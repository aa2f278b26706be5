import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data.chat import IGNORE_INDEX, render_conversation
from mllm.data.dataset import SupervisedDataset
from mllm.data.layout import num_image_tokens
from mllm.data.readers import ImageRef, Sample
from viq.config import PreprocessConfig
from viq.image import predict_grid

AREA = 64 * 64  # tiny images: a 64x64 picture is a 4x4 grid -> 2*3+2 = 8 tokens


def sample(sid, images, question="<image>\nWhat colour?", answer="red"):
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Sample(sid, turns, [ImageRef(p) if not isinstance(p, ImageRef) else p for p in images])


def make_ds(samples, tok, **kw):
    kw.setdefault("image", PreprocessConfig(area=AREA))
    return SupervisedDataset(samples, tok, patch_size=16, **kw)


def image_grid(width, height, area, multiple):
    return predict_grid(width, height, patch_size=16, area=area, multiple=multiple)


def noise_png(path, width=64, height=64):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def image_spans(ids, image_id):
    """(start, end) of each run of image tokens."""
    spans, start = [], None
    for i, t in enumerate([*ids, -1]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_expansion_counts(tok, make_image):
    a, b = make_image("a.png", 64, 64), make_image("b.png", 300, 100)
    s = sample("two", [a, b], question="<image>\nand\n<image>\nSame colour?", answer="yes")
    ds = make_ds([s], tok)
    item = ds[0]
    image_id = tok.convert_tokens_to_ids("<image>")
    grids = [image_grid(64, 64, AREA, 32), image_grid(300, 100, AREA, 32)]
    assert item["image_grids"].tolist() == [list(g) for g in grids]
    spans = image_spans(item["input_ids"].tolist(), image_id)
    assert [e - s for s, e in spans] == [num_image_tokens(*g) for g in grids] == [8, 6]
    assert (item["labels"][item["input_ids"] == image_id] == IGNORE_INDEX).all()
    rendered = render_conversation(s.turns, tok)
    text_ids = [t for t in rendered["input_ids"] if t != image_id]
    assert [t for t in item["input_ids"].tolist() if t != image_id] == text_ids
    assert ds.lengths == [len(item["input_ids"])] == [len(rendered["input_ids"]) - 2 + 14]
    assert [tuple(x.shape) for x in item["pixel_values"]] == [(3, 16 * g[0], 16 * g[1]) for g in grids]
    assert item["input_ids"].dtype == item["labels"].dtype == item["image_grids"].dtype == torch.long


def test_text_only_and_per_image_resize(tok, make_image):
    a = make_image("a.png", 200, 100)
    text = Sample("t", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    viq = sample("v", [ImageRef(a, resize=128 * 128, multiple=16)])
    ds = make_ds([text, viq], tok)
    assert ds[0]["image_grids"].shape == (0, 2) and ds[0]["pixel_values"] == []
    # the per-image area wins over the data set's; multiple 16 is promoted to 32 for an even grid
    assert tuple(ds.records[1].grids[0]) == image_grid(200, 100, 128 * 128, 32) == (6, 12)
    assert ds[1]["image_grids"].tolist() == [[6, 12]]


def test_bad_samples_counted(tok, make_image, tmp_path):
    good = make_image("good.png")
    (tmp_path / "garbage.png").write_bytes(b"definitely not an image")
    samples = [
        sample("ok", [good]),
        sample("missing", [tmp_path / "nope.png"]),
        sample("corrupt", [tmp_path / "garbage.png"]),
        sample("mismatch", [good, good]),
        sample("no-placeholder", [good], question="What colour?"),
        sample("too-long", [ImageRef(good, resize=512 * 512)]),  # 274 image tokens
        Sample("empty", []),
        Sample("no-answer", [{"role": "user", "content": "hi"}]),
        Sample("robot", [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]),
    ]
    ds = make_ds(samples, tok, max_seq_len=200)
    assert [r.id for r in ds.records] == ["ok"]
    assert ds.skipped == {
        "missing image": 1,
        "corrupt image": 1,
        "image count mismatch": 2,
        "too long": 1,
        "empty conversation": 1,
        "no assistant turn": 1,
        "unknown role": 1,
    }
    for bad in samples[1:]:
        with pytest.raises(ValueError, match=f"'{bad.id}'"):
            make_ds([samples[0], bad], tok, max_seq_len=200, strict=True)


def test_empty_after_filtering(tok, tmp_path):
    with pytest.raises(ValueError, match="no usable samples.*missing image"):
        make_ds([sample("m", [tmp_path / "nope.png"])], tok)
    with pytest.raises(ValueError, match="no usable samples"):
        make_ds([], tok)


def test_truncation_keeps_image_spans(tok, make_image):
    img = make_image("a.png")
    long_answer = " ".join(["red square"] * 40)
    s = sample("long", [img], answer=long_answer)
    full = make_ds([s], tok, max_seq_len=4096).lengths[0]
    ds = make_ds([s], tok, max_seq_len=full - 20)
    item = ds[0]
    assert ds.lengths == [full - 20] == [len(item["input_ids"])] and ds.truncated == 1
    image_id = tok.convert_tokens_to_ids("<image>")
    assert [e - b for b, e in image_spans(item["input_ids"].tolist(), image_id)] == [8]
    assert (item["labels"] != IGNORE_INDEX).sum() > 0

    # the cut would fall inside the image span (image after the text) -> skipped, never cut
    late = sample("late", [img], question="Look " * 30 + "<image>", answer="ok")
    n = make_ds([late], tok, max_seq_len=4096).lengths[0]
    ds2 = make_ds([sample("short", [img]), late], tok, max_seq_len=n - 15)
    assert [r.id for r in ds2.records] == ["short"] and ds2.skipped == {"too long": 1}
    # a cut after the image that would keep no supervised token -> skipped, for that reason
    ds3 = make_ds([s, late], tok, max_seq_len=n - 3)
    assert [r.id for r in ds3.records] == ["long"] and ds3.skipped == {"all labels masked": 1}
    wordy = sample("wordy", [img], question="<image>" + " blue" * 60, answer="ok")
    m = make_ds([wordy], tok, max_seq_len=4096).lengths[0]
    with pytest.raises(ValueError, match="'wordy'.*too long|max_seq_len"):
        make_ds([wordy], tok, max_seq_len=m - 5, strict=True)


def test_corrupt_data_found_at_load(tok, make_image, tmp_path):
    from bad_files import corrupt_png_keeping_checksums

    # damage that the checksums do not show: only decoding finds it
    png = corrupt_png_keeping_checksums(noise_png(tmp_path / "bad.png"))
    samples = [sample("s0", [make_image("a.png")]), sample("bad", [png]), sample("s2", [make_image("c.png")])]
    ds = make_ds(samples, tok)
    assert len(ds) == 3 and not ds.skipped  # the header parses, the checksums match
    expected = ds[2]
    got = ds[1]  # the next good sample, deterministically
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert ds.skipped == {"corrupt image (at load)": 1}
    assert ds.try_load(1) is None
    strict = make_ds(samples, tok, strict=True)
    with pytest.raises(ValueError, match="'bad'"):
        strict[1]


def test_invalid_arguments(tok):
    with pytest.raises(ValueError, match="image mode 'zoom'"):
        make_ds([], tok, image=PreprocessConfig(mode="zoom"))
    with pytest.raises(ValueError, match="max_seq_len"):
        make_ds([], tok, max_seq_len=0)
