"""Stage chaining through the explicit key map (mllm.stages.init): 2-1 -> 2-2 loads every tensor whose shape
still fits, re-initialises exactly the changed ones and says which; bad init directories are named."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from mllm.config import load_recipe
from mllm.model.layout import VIQ_DIR
from mllm.stages.init import load_stage_tokenizer, stage_tokenizer_config
from viq.config import preset
from viq.quantize import FSQ
from viq.tokenizer import ViQTokenizer

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "tokenizer" / "debug"
# the tensors whose shape depends on the code width (bottleneck 16 vs 4 FSQ levels), and the codebook
RESHAPED = ["head.embedder.codebook", "head.embedder.project_out.weight", "head.project_in.bias",
            "head.project_in.weight"]
# the head-wise RoPE block of the debug FSQ head: the proximal head has none (as the reference's FakeQuantizer)
ROPE = sorted(f"head.rope_blocks.0.{name}.{p}" for name in (
    "norm1", "attn.decrease_dim", "attn.qkv", "attn.proj", "attn.increase_dim", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias"))
CHANGED = sorted(RESHAPED + ROPE)


def saved_tokenizer(path: Path, quantizer: str, seed: int) -> ViQTokenizer:
    cfg = preset("debug")
    tok = ViQTokenizer.from_preset("debug", seed=seed, head=dataclasses.replace(cfg.head, quantizer=quantizer))
    tok.save_pretrained(path)
    return tok


def recipe(name: str, init: Path | str, *extra: str):
    return load_recipe(RECIPES / f"{name}.yaml", [f"stage.init={init}", *extra])


def test_proximal_to_fsq_loads_all_that_fits(tmp_path, caplog):
    source = saved_tokenizer(tmp_path / "p" / VIQ_DIR, "linf", seed=1)
    cfg = recipe("stage2_2_fsq", tmp_path / "p")  # the stage's output dir: viq_tokenizer/ is found in it
    with caplog.at_level(logging.INFO, logger="mllm"):
        tok, report, init = load_stage_tokenizer(cfg)
    assert tok.head.fsq is not None and tok.cfg.head.levels == (8, 5, 5, 5)
    assert report.reinitialised == CHANGED
    assert report.ignored == []
    src, own = source.state_dict(), tok.state_dict()
    assert sorted(report.loaded) == sorted(set(own) - set(CHANGED))
    for key in report.loaded:
        assert torch.equal(own[key], src[key]), key
    # the changed tensors keep the stage's seeded fresh initialisation; the codebook is the implicit one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        fresh = ViQTokenizer(stage_tokenizer_config(source.cfg, cfg.stage)).state_dict()
    assert ROPE == sorted(k for k in own if k.startswith("head.rope_blocks."))  # all of them start fresh
    for key in CHANGED:
        assert torch.equal(own[key], fresh[key]), key
    assert torch.equal(own["head.embedder.codebook"], FSQ((8, 5, 5, 5)).implicit_codebook())
    # the log names every re-initialised tensor
    text = caplog.text
    assert all(key in text for key in CHANGED) and "re-initialised" in text


def test_fsq_to_proximal_ignores_the_codebook_and_the_headwise_blocks(tmp_path):
    saved_tokenizer(tmp_path / "s1", "fsq", seed=2)  # a stage-1 directory (its head is the preset's FSQ one)
    tok, report, _ = load_stage_tokenizer(recipe("stage2_1_proximal", tmp_path / "s1"))
    assert tok.head.fsq is None and tok.cfg.head.bottleneck_dim == 16 and len(tok.head.rope_blocks) == 0
    assert sorted(report.ignored) == sorted(["head.embedder.codebook", *ROPE])
    assert report.reinitialised == ["head.embedder.project_out.weight", "head.project_in.bias",
                                    "head.project_in.weight"]


def test_proximal_rope_variant_hands_its_blocks_on(tmp_path):
    """head.proximal_rope_blocks=true: the variant whose 2-1 head has the head-wise blocks; 2-2 loads them."""
    cfg = preset("debug")
    head = dataclasses.replace(cfg.head, quantizer="linf", proximal_rope_blocks=True)
    source = ViQTokenizer.from_preset("debug", seed=4, head=head)
    source.save_pretrained(tmp_path / "p")
    tok, report, _ = load_stage_tokenizer(recipe("stage2_2_fsq", tmp_path / "p"))
    assert report.reinitialised == RESHAPED
    assert all(torch.equal(tok.state_dict()[k], source.state_dict()[k]) for k in ROPE)


def test_head_position_of_the_fsq_stage(tmp_path):
    """stage.head_position sets the 2-2 head's position encoding; a learned table starts fresh and is listed."""
    saved_tokenizer(tmp_path / "p", "linf", seed=5)
    tok, report, _ = load_stage_tokenizer(recipe("stage2_2_fsq", tmp_path / "p", "stage.head_position=learnable"))
    assert tok.cfg.head.position == "learnable" and tok.head.rope is None
    assert report.reinitialised == sorted(CHANGED + ["head.positions.table"])
    none, _, _ = load_stage_tokenizer(recipe("stage2_2_fsq", tmp_path / "p", "stage.head_position=none"))
    assert none.cfg.head.position == "none" and none.head.rope is None and none.head.positions is None


def test_same_head_loads_everything(tmp_path):
    source = saved_tokenizer(tmp_path / "f", "fsq", seed=3)
    tok, report, _ = load_stage_tokenizer(recipe("stage2_2_fsq", tmp_path / "f"))
    assert report.reinitialised == [] and report.ignored == []
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in tok.state_dict().items())


def test_decoder_stage_needs_an_fsq_head(tmp_path):
    saved_tokenizer(tmp_path / "p", "linf", seed=0)
    with pytest.raises(ValueError, match="FSQ quantizer.*'linf'"):
        load_stage_tokenizer(recipe("decoder", tmp_path / "p"))


def test_bad_init_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="stage.init .*empty.* holds no ViQ tokenizer: expected a ViQ preset"):
        load_stage_tokenizer(recipe("stage2_2_fsq", tmp_path / "empty"))
