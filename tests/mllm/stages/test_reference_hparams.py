"""The real-scale tokenizer recipes follow the reference's hyper-parameters (viq-reference.md §4.6, §5.3, §9):
DoRA r 64 / alpha 16 / dropout 0.05 on all seven projections, AdamW weight decay 1e-4, 5 % warm-up, cosine to
a floor of 0.1, the VAE-latent target in stages 2-1 and 2-2, and the 64k codebook for g."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mllm_helpers import RECIPES
from transformers import get_scheduler

from mllm.config import load_recipe
from mllm.model.build import add_lora
from mllm.model.llm import LORA_TARGETS, load_llm
from mllm.train.trainer import training_arguments
from viq.quantize import FSQ_PRESETS

TOK = RECIPES / "tokenizer"
LLM_STAGES = ["stage1", "stage2_1_proximal", "stage2_2_fsq"]


@pytest.mark.parametrize("size", ["so400m", "g"])
@pytest.mark.parametrize("name", LLM_STAGES)
def test_real_scale_recipes_use_the_reference_settings(size, name):
    cfg = load_recipe(TOK / size / f"{name}.yaml")
    lora, t, st = cfg.lora, cfg.train, cfg.stage
    assert (lora.r, lora.alpha, lora.dropout, lora.dora, lora.targets) == (64, 16.0, 0.05, True, None)
    assert (t.weight_decay, t.warmup_ratio, t.min_lr_ratio) == (1e-4, 0.05, 0.1)
    if name == "stage1":
        assert st.recon_target == "none"
    else:
        assert st.recon_target == "vae_latent" and st.vae and st.perceptual is None
    if name == "stage2_2_fsq":
        assert st.levels == (FSQ_PRESETS["64k"] if size == "g" else FSQ_PRESETS["16k"])


def test_cosine_schedule_has_the_reference_floor(tmp_path):
    """5 % linear warm-up to the peak, cosine down to 0.1 x the peak at the last step (not to zero)."""
    cfg = load_recipe(TOK / "g" / "stage1.yaml", [f"train.output_dir={tmp_path}", "train.deepspeed=null"])
    args = training_arguments(cfg, torch.float32, has_eval=False)
    peak, steps = 1.0, 200
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(steps),
                          num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert args.get_warmup_steps(steps) == 10
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(peak)
    assert lrs[105] == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lrs[steps] == pytest.approx(0.1) and min(lrs[10:]) == pytest.approx(0.1)
    assert args.weight_decay == 1e-4


def test_dora_adapters_on_all_seven_projections(tmp_path):
    cfg = load_recipe(TOK / "debug" / "stage1.yaml", [f"train.output_dir={tmp_path}"])
    reference_lora = load_recipe(TOK / "g" / "stage1.yaml").lora
    cfg = dataclasses.replace(cfg, lora=reference_lora)
    llm, _ = load_llm("debug", init="random")
    peft_llm = add_lora(llm, cfg)
    config = peft_llm.peft_config["default"]
    assert config.use_dora and (config.r, config.lora_alpha, config.lora_dropout) == (64, 16.0, 0.05)
    layers = llm.config.num_hidden_layers
    for proj in LORA_TARGETS["qwen2"]:  # q, k, v, o, gate, up, down
        magnitudes = [n for n, _ in peft_llm.named_parameters() if f"{proj}.lora_magnitude_vector" in n]
        assert len(magnitudes) == layers, proj
    assert len(LORA_TARGETS["qwen2"]) == 7
