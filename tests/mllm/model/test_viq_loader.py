"""One resolver for every place a ViQ tokenizer is named (mllm.model.viq_loader): a preset, a tokenizer
directory, or a directory holding viq_tokenizer/ (stage output, MLLM export); one error for a wrong path."""

from __future__ import annotations

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides

from mllm.config import load_recipe
from mllm.model.build import build_mllm
from mllm.model.layout import VIQ_DIR
from mllm.model.viq_loader import load_viq, viq_dir
from mllm.tools.evaluate import eval_main
from mllm.tools.extract import extract
from viq import ViQTokenizer


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    """A directory laid out as a tokenizer stage's output: the tokenizer under viq_tokenizer/."""
    root = tmp_path_factory.mktemp("stage-out")
    ViQTokenizer.from_preset("debug", seed=3).save_pretrained(root / VIQ_DIR)
    return root


def _same_weights(a: ViQTokenizer, b: ViQTokenizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_form_names_the_same_tokenizer(stage_dir):
    saved = ViQTokenizer.from_pretrained(stage_dir / VIQ_DIR)
    assert viq_dir(stage_dir) == stage_dir / VIQ_DIR
    assert viq_dir(stage_dir / VIQ_DIR) == stage_dir / VIQ_DIR
    assert _same_weights(load_viq(stage_dir), saved)
    assert _same_weights(load_viq(str(stage_dir / VIQ_DIR)), saved)
    assert _same_weights(load_viq("debug", seed=3), saved)  # the preset is seeded
    assert load_viq(saved) is saved


def test_model_tokenizer_takes_a_stage_output_dir(stage_dir, demo_data, tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_full.yaml",
                      [*debug_overrides(demo_data, tmp_path), f"model.tokenizer={stage_dir}"])
    built = build_mllm(cfg, cuda=False)
    saved = ViQTokenizer.from_pretrained(stage_dir / VIQ_DIR)
    emb = built.model.visual.embedder.state_dict()
    assert all(torch.equal(v, saved.head.embedder.state_dict()[k]) for k, v in emb.items())


def test_extract_takes_a_stage_output_dir(stage_dir, demo_data, tmp_path):
    from mllm.data.codes import CodeStore

    extract(stage_dir, demo_data["test"], tmp_path / "codes", preprocess={"area": 4096})
    store = CodeStore(tmp_path / "codes", expected_tokenizer=ViQTokenizer.from_pretrained(stage_dir / VIQ_DIR))
    assert len(store) > 0


@pytest.mark.parametrize("where", ["model.tokenizer", "extract", "--tokenizer"])
def test_a_wrong_path_gives_the_same_error_everywhere(where, demo_data, tmp_path, capsys):
    bad = tmp_path / "no-such-tokenizer"
    if where == "--tokenizer":  # the command prints the error and exits 1
        assert eval_main(["--tokenizer", str(bad), "--data", str(demo_data["test"])]) == 1
        msg = capsys.readouterr().err
    else:
        with pytest.raises(ValueError) as err:
            if where == "model.tokenizer":
                build_mllm(load_recipe(RECIPES / "debug" / "sft_full.yaml",
                                       [*debug_overrides(demo_data, tmp_path), f"model.tokenizer={bad}"]), cuda=False)
            else:
                extract(bad, demo_data["test"], tmp_path / "codes")
        msg = str(err.value)
    assert f"{where} " in msg or where == "extract"
    assert str(bad) in msg and "does not exist" in msg and VIQ_DIR in msg and "debug" in msg


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no ViQ tokenizer"):
        load_viq(tmp_path, what="stage.init")
