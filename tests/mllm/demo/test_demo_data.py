import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mllm.demo.data import BACKGROUND, COLOURS, OPTIONS, QUESTION_TYPES, generate_demo
from viq.image import patch_grid, resize_area

SIZES = {"n_train": 60, "n_val": 12, "n_test": 12}


def tree_hashes(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo(out, **SIZES, seed=3)


def test_byte_identical_for_same_seed(demo, tmp_path):
    out, _ = demo
    generate_demo(tmp_path / "again", **SIZES, seed=3)
    first, second = tree_hashes(out), tree_hashes(tmp_path / "again")
    assert len(first) == 60 + 12 + 12 + 4  # PNGs, three JSON files, the manifest
    assert first == second
    generate_demo(tmp_path / "other", **SIZES, seed=4)
    assert tree_hashes(tmp_path / "other")["train.json"] != first["train.json"]


def test_idempotent(tmp_path):
    paths = generate_demo(tmp_path, n_train=6, n_val=6, n_test=6)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert generate_demo(tmp_path, n_train=6, n_val=6, n_test=6) == paths
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    generate_demo(tmp_path, n_train=12, n_val=6, n_test=6)  # other sizes: regenerated
    assert len(json.loads(paths["train"].read_text())) == 12
    assert json.loads((tmp_path / "manifest.json").read_text())["sizes"]["train"] == 12


def test_records(demo):
    out, paths = demo
    assert set(paths) == {"train", "val", "test"}
    records = json.loads(paths["train"].read_text())
    assert len(records) == 60 and len({r["id"] for r in records}) == 60
    for r in records:
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert r["question_type"] in QUESTION_TYPES
        if r["question_type"] != "caption":
            assert gpt["value"] in OPTIONS[r["question_type"]]
        assert (out / r["image"]).is_file() and r["image"] == f"images/train/{r['id']}.png"


def test_answers_balanced(demo):
    records = json.loads(demo[1]["train"].read_text())
    by_type = Counter(r["question_type"] for r in records)
    assert set(by_type.values()) == {10}
    for qtype, options in OPTIONS.items():
        assert len(options) >= 4  # chance <= 25%
        answers = Counter(r["conversations"][1]["value"] for r in records if r["question_type"] == qtype)
        counts = [answers.get(o, 0) for o in options]
        assert max(counts) - min(counts) <= 1, (qtype, answers)


def test_sizes_varied_and_even_grids(demo):
    out, paths = demo
    sizes = [Image.open(out / r["image"]).size for r in json.loads(paths["train"].read_text())]
    assert len(set(sizes)) >= 40
    for w, h in sizes:
        assert 96 <= min(w, h) and max(w, h) <= 384
        assert 1 / 3.05 <= w / h <= 3.05
        gh, gw = patch_grid(*resize_area(w, h, 384 * 384, 32)[::-1], 16)
        assert gh % 2 == 0 and gw % 2 == 0
    assert any(w > 2 * h for w, h in sizes) and any(h > 2 * w for w, h in sizes)


def test_scene_content_matches_answer(demo):
    out, paths = demo
    records = json.loads(paths["train"].read_text())
    for r in records:
        qtype, answer = r["question_type"], r["conversations"][1]["value"]
        px = np.asarray(Image.open(out / r["image"]))
        if qtype == "colour":
            assert (px == COLOURS[answer]).all(-1).sum() > 50
            assert not any((px == c).all(-1).any() for name, c in COLOURS.items() if name != answer)
        if qtype == "position":
            ys, xs = np.nonzero((px != BACKGROUND).any(-1))
            fy, fx = ys.mean() / px.shape[0], xs.mean() / px.shape[1]
            expected = {"left": fx < 0.35, "right": fx > 0.65, "top": fy < 0.35, "bottom": fy > 0.65}
            assert expected[answer], (r["id"], answer, fx, fy)
        if qtype == "shape":  # the large central variant: at least a fifth of the short side across
            ys, xs = np.nonzero((px != BACKGROUND).any(-1))
            assert 0.3 < ys.mean() / px.shape[0] < 0.7 and 0.3 < xs.mean() / px.shape[1] < 0.7, r["id"]
            assert min(np.ptp(ys), np.ptp(xs)) > 0.2 * min(px.shape[:2]), r["id"]
        if qtype == "word":  # landscape, so the word stays several patches tall
            assert px.shape[1] >= 1.49 * px.shape[0], (r["id"], px.shape)
            ys, _ = np.nonzero((px != BACKGROUND).any(-1))
            assert np.ptp(ys) > 0.25 * px.shape[0], r["id"]


def test_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_val"):
        generate_demo(tmp_path, n_val=-1)


def test_debug_tokenizer_corpus_is_the_demo_corpus():
    # the debug LLM's tokenizer trains on a frozen copy of the demo phrases (the model layer may not import
    # the demo); a change to the demo's wording must be copied there, or its words split into bytes
    from mllm.demo.data import demo_corpus
    from mllm.model.text_tokenizer import DEBUG_CORPUS

    assert DEBUG_CORPUS.read_text().splitlines() == demo_corpus()


def test_data_demo_never_writes_over_a_users_files(tmp_path):
    # issue 13, case 0: data.demo=true with data.train naming the user's own file must leave it alone
    from mllm.demo.data import prepare_recipe_data

    user = tmp_path / "my" / "train.json"
    user.parent.mkdir()
    user.write_text('[{"id": "mine"}]')
    prepare_recipe_data(user, 10)
    assert user.read_text() == '[{"id": "mine"}]' and not (user.parent / "images").exists()
    # a folder with a user's val.json but no train.json: the generator refuses rather than replace it
    other = tmp_path / "other"
    other.mkdir()
    (other / "val.json").write_text("[]")
    with pytest.raises(ValueError, match="val.json exists and was not written by the demo"):
        prepare_recipe_data(other / "train.json", 10)
    assert (other / "val.json").read_text() == "[]" and not (other / "train.json").exists()
    # the demo's own folder is brought to the requested size, and is a no-op when it is there
    demo = tmp_path / "demo" / "train.json"
    prepare_recipe_data(demo, 10)
    first = demo.read_bytes()
    prepare_recipe_data(demo, 10)
    assert demo.read_bytes() == first and len(json.loads(first)) == 10
    prepare_recipe_data(demo, 20)
    assert len(json.loads(demo.read_text())) == 20
