"""``viq plan`` (mllm.train.memory): the parameter counts of the meta-device build are those of the model a run
builds, and the per-GPU estimate is the ZeRO accounting of those counts."""

from __future__ import annotations

import pytest

from mllm.cli import main
from mllm.config import load_recipe
from mllm.model.build import build_mllm
from mllm.train.memory import ADAM_STATE_BYTES, SETUPS, activation_bytes, count_parameters, estimate, meta_model

DEBUG = ("debug/sft_full", "debug/sft_lora", "debug/sft_lora_continuous", "debug/pretrain_projector")


def recipe(name: str, *overrides: str):
    return load_recipe(name, ["train.output_dir=unused", *overrides])


@pytest.mark.parametrize("name", DEBUG)
def test_meta_counts_are_the_built_models(name):
    cfg = recipe(name)
    built = build_mllm(cfg, cuda=False)
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in built.model.parameters())
    assert counts.trainable == sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    own = {id(p) for p in built.model.parameters()}
    expected_encoder = 0 if built.code_encoder is None else sum(
        p.numel() for p in built.code_encoder.parameters() if id(p) not in own)
    assert counts.code_encoder == expected_encoder
    assert 0 < counts.trainable <= counts.total


def test_a_published_llm_has_its_published_size():
    # Qwen2.5-7B-Instruct: 7,615,616,512 parameters (its model card's 7.61B), counted here without any weights
    model, _ = meta_model(recipe("qwen2.5/sft_full", "model.llm=qwen2.5-7b", "model.tokenizer=so400m",
                                 "model.tokenizer_init=random"))
    assert sum(p.numel() for p in model.llm.parameters()) == 7_615_616_512
    assert all(p.is_meta for p in model.parameters())


def test_at_7b_each_setup_needs_less_than_the_one_before():
    cfg = recipe("qwen2.5/sft_full", "model.llm=qwen2.5-7b", "model.tokenizer=so400m", "model.tokenizer_init=random")
    counts = count_parameters(cfg)
    for checkpointing in (False, True):
        totals = [estimate(cfg, counts, s, 8).gpu(checkpointing) for s in SETUPS]
        assert totals == sorted(totals, reverse=True), totals


def test_the_estimate_is_the_zero_accounting_of_the_counts():
    cfg = recipe("debug/sft_lora")  # dtype auto: bf16 on the GPUs the plan is for
    counts = count_parameters(cfg)
    p, t, n = counts.total, counts.trainable, 4
    rows = {s.name: estimate(cfg, counts, s, n) for s in SETUPS}
    ddp = rows["DDP (no ZeRO)"]
    assert (ddp.params, ddp.grads, ddp.optimizer) == (4 * t + 2 * (p - t), 4 * t, 8 * t)
    assert rows["ZeRO-1"].params == 2 * p and rows["ZeRO-1"].grads == 2 * t
    assert rows["ZeRO-1"].optimizer == rows["ZeRO-2"].optimizer == ADAM_STATE_BYTES * t / n
    assert rows["ZeRO-2"].grads == 2 * t / n
    z3 = rows["ZeRO-3"]
    assert (z3.params, z3.grads, z3.optimizer, z3.host) == (2 * p / n, 2 * t / n, ADAM_STATE_BYTES * t / n, 0)
    assert z3.gathered == 2 * 2 * counts.largest_module
    off = rows["ZeRO-3 + optimizer offload"]
    assert (off.optimizer, off.grads, off.host) == (0, 0, ADAM_STATE_BYTES * t / n + 4 * t / n)
    both = rows["ZeRO-3 + optimizer and parameter offload"]
    assert both.params == 0 and both.host == off.host + 2 * p / n
    # the total is the sum of its parts. (On this tiny model ZeRO-3 takes more than ZeRO-2: gathering the
    # embedding, a large share of it, costs more than partitioning saves; see the 7B case below)
    assert z3.gpu(True) == z3.params + z3.grads + z3.optimizer + z3.gathered + z3.activations_checkpointed \
        + z3.code_encoder


def test_activations_grow_with_the_sequence_and_checkpointing_keeps_less():
    counts = count_parameters(recipe("debug/sft_full"))
    full_short, gc_short = activation_bytes(recipe("debug/sft_full", "data.max_seq_len=2048"), counts, 2)
    full_long, gc_long = activation_bytes(recipe("debug/sft_full", "data.max_seq_len=4096"), counts, 2)
    assert gc_short < full_short and gc_long < full_long
    loss = 2 * 1024 * counts.vocab * 4  # one chunk of fp32 logits and their gradient, whatever the length
    assert full_long - loss == pytest.approx(2 * (full_short - loss))


def test_viq_plan_prints_every_setup_and_marks_the_recipes(capsys):
    assert main(["plan", "debug/sft_full", "train.deepspeed=recipes/deepspeed/zero3_offload.json",
                 "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    names = {s.name for s in SETUPS}
    rows = [line for line in out.splitlines() if line[2:44].strip() in names]
    assert [r[2:44].strip() for r in rows] == [s.name for s in SETUPS]
    assert [r[0] for r in rows] == [" "] * 5 + ["*"]
    assert "world size 2" in out


def test_viq_plan_names_a_tokenizer_it_cannot_find(capsys, tmp_path):
    assert main(["plan", "debug/sft_full", f"model.tokenizer={tmp_path / 'missing'}", "model.tokenizer_init=pretrained"]
                ) == 1
    assert "model.tokenizer=so400m model.tokenizer_init=random" in capsys.readouterr().err


def test_fp32_weights_take_four_bytes():
    cfg = recipe("debug/sft_full", "model.dtype=float32")
    counts = count_parameters(cfg)
    assert estimate(cfg, counts, SETUPS[3], 1).params == 4 * counts.total
