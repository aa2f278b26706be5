"""``viq data inspect``: the printed samples, image token counts, packing plan and skip counts are the
trainer's own, and no LLM weights are built."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mllm_helpers import RECIPES, debug_overrides

from mllm.cli import main as cli_main
from mllm.data.chat import IM_END
from mllm.data.codes import CodeStore, default_image_root, image_key
from mllm.data.layout import num_image_tokens
from mllm.data.readers import ImageRef
from mllm.tools.extract import extract
from mllm.tools.inspect_data import main
from viq import ViQTokenizer

RECIPE = str(RECIPES / "debug" / "sft_full.yaml")
HEADER = re.compile(r"^== sample (\d+) id='(.*)': (\d+) tokens, (\d+) images?(?:, pack (\d+))?$")
IMAGE = re.compile(r"^image \d+: grid (\d+)x(\d+) -> (\d+) tokens  (.*)$")
PACK = re.compile(r"^pack (\d+): (\d+)/(\d+) tokens: (.*)$")


def _inspect(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["inspect", *argv]) == 0
    return capsys.readouterr().out


def _samples(out: str) -> list[dict]:
    """Each rendered sample: header fields, its images and its text block."""
    samples, current = [], None
    for line in out.splitlines():
        if (m := HEADER.match(line)) is not None:
            current = {"index": int(m[1]), "id": m[2], "length": int(m[3]), "pack": m[5], "images": [], "text": []}
            samples.append(current)
        elif line.startswith("packing plan"):
            current = None
        elif current is not None and (m := IMAGE.match(line)) is not None and not current["text"]:
            current["images"].append({"grid": (int(m[1]), int(m[2])), "tokens": int(m[3]), "path": m[4]})
        elif current is not None:
            current["text"].append(line)
    for s in samples:
        s["text"] = "\n".join(s["text"])
    return samples


def _plan(out: str) -> list[tuple[int, int, list[tuple[int, int]]]]:
    plan = []
    for line in out.splitlines():
        if (m := PACK.match(line)) is not None:
            members = [(int(i), int(n)) for i, n in re.findall(r"(\d+) \((\d+)\)", m[4])]
            plan.append((int(m[2]), int(m[3]), members))
    return plan


def _answers(train: Path) -> dict[str, list[str]]:
    records = json.loads(train.read_text())
    return {str(r["id"]): [t["value"] for t in r["conversations"] if t["from"] == "gpt"] for r in records}


def test_samples_spans_images_and_plan(demo_data, tmp_path, capsys):
    out = _inspect(capsys, RECIPE, *debug_overrides(demo_data, tmp_path / "run"), "--n", "48", "--packs", "0")
    samples = _samples(out)
    answers = _answers(demo_data["train"])
    assert [s["index"] for s in samples] == list(range(48))
    for s in samples:
        spans = re.findall(r"«(.*?)»", s["text"], flags=re.S)
        assert [span.removesuffix(IM_END) for span in spans] == answers[s["id"]], s["id"]
        assert all(span.endswith(IM_END) for span in spans)  # the end-of-turn token is supervised too
        assert s["images"], s["id"]
        for im in s["images"]:
            assert im["tokens"] == num_image_tokens(*im["grid"])
        assert [int(k) for k in re.findall(r"<image×(\d+)>", s["text"])] == [im["tokens"] for im in s["images"]]
    plan = _plan(out)
    members = [i for _, _, pack in plan for i, _ in pack]
    assert sorted(members) == list(range(48))  # every sample in exactly one pack
    lengths = {s["index"]: s["length"] for s in samples}
    for k, (total, limit, pack) in enumerate(plan):
        assert limit == 256 and total <= limit and total == sum(n for _, n in pack)
        assert all(lengths[i] == n for i, n in pack)
        assert all(int(samples[i]["pack"]) == k for i, _ in pack)
    assert "samples: 48 kept of 48 read, 0 truncated; skipped: none" in out


def test_codes_recipe_shows_the_codes_grids_and_builds_no_llm(demo_data, tmp_path, capsys, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("viq data inspect built LLM weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    tok = tmp_path / "tok"
    ViQTokenizer.from_preset("debug", seed=0).save_pretrained(tok)
    codes = tmp_path / "codes"
    extract(str(tok), demo_data["train"], codes, preprocess={"area": 9216, "multiple": 32}, progress=False)
    out = _inspect(capsys, RECIPE, *debug_overrides(demo_data, tmp_path / "run", f"model.tokenizer={tok}",
                                                    f"data.codes={codes}", "data.image=null"), "--n", "6")
    assert f"inherited from the codes in {codes}" in out and "area=9216" in out
    store, root = CodeStore(codes), default_image_root(demo_data["train"])
    samples = _samples(out)
    assert len(samples) == 6
    for s in samples:
        for im in s["images"]:
            assert im["grid"] == store.grid(image_key(ImageRef(Path(im["path"])), root))


def test_skip_counts_by_reason(demo_data, tmp_path, capsys):
    # too short for some samples: skipped (training would stop on so many), yet reported with their reasons
    out = _inspect(capsys, RECIPE, *debug_overrides(demo_data, tmp_path / "run", "data.max_seq_len=40"), "--n", "1")
    m = re.search(r"^samples: (\d+) kept of 48 read, (\d+) truncated; skipped: (.*)$", out, flags=re.M)
    assert m is not None, out
    counts = {reason: int(n) for reason, n in re.findall(r"([^,:]+): (\d+)", m[3])}
    assert counts and int(m[1]) + sum(counts.values()) == 48
    assert f"training would stop here: {sum(counts.values())} of 48 samples skipped" in out
    assert _plan(out) and len(_samples(out)) == 1


def test_help_and_errors(capsys, tmp_path):
    for argv, expected in ((["data", "--help"], "inspect"), (["data", "inspect", "--help"], "--n N")):
        with pytest.raises(SystemExit) as stop:
            cli_main(argv)
        assert stop.value.code == 0
        assert expected in capsys.readouterr().out
    assert main(["inspect", RECIPE, f"data.train={tmp_path / 'missing.json'}", "data.demo=false"]) == 1
    assert "missing.json" in capsys.readouterr().err
