"""Training from offline code shards: the same losses as computing the codes inside the step."""

import json
from pathlib import Path

import pytest

from mllm.cli import main
from mllm.tools.extract import extract
from viq import ViQTokenizer

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "debug" / "sft_full.yaml"


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    ViQTokenizer.from_preset("debug", seed=0).save_pretrained(path)
    return path


def _train(tmp_path, demo_data, tokenizer_dir, name, *extra):
    out = tmp_path / name
    common = [f"data.train={demo_data['train']}", "data.demo=false", f"model.tokenizer={tokenizer_dir}",
              f"train.output_dir={out}", "train.max_steps=4"]
    assert main(["train", str(RECIPE), *common, *extra]) == 0
    return _losses(out)


def test_codes_shards_give_the_online_losses(tmp_path, demo_data, tokenizer_dir):
    # the extraction must use the recipe's image settings: it is what the online path computes
    shards = tmp_path / "codes"
    extract(str(tokenizer_dir), demo_data["train"], shards, preprocess={"area": 4096, "multiple": 32},
            progress=False)
    online = _train(tmp_path, demo_data, tokenizer_dir, "online")
    offline = _train(tmp_path, demo_data, tokenizer_dir, "offline", f"data.codes={shards}")
    assert len(online) == len(offline) == 4
    assert offline == pytest.approx(online, rel=1e-5, abs=1e-6)


def test_codes_from_another_tokenizer_are_refused(tmp_path, demo_data, tokenizer_dir):
    shards = tmp_path / "codes"
    other = tmp_path / "other"
    ViQTokenizer.from_preset("debug", seed=1).save_pretrained(other)
    extract(str(other), demo_data["train"], shards, preprocess={"area": 4096, "multiple": 32}, progress=False)
    with pytest.raises(ValueError, match="not from the given tokenizer"):
        _train(tmp_path, demo_data, tokenizer_dir, "bad", f"data.codes={shards}")
