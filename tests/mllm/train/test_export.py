"""`viq export` merges LoRA into the LLM: the exported llm/ loads in plain transformers and gives the
merged model's logits, and the whole exported MLLM rebuilds and gives the checkpoint's loss."""

from __future__ import annotations

import torch
from mllm_helpers import RECIPES, debug_overrides
from transformers import AutoModelForCausalLM

from mllm.cli import main
from mllm.config import load_recipe
from mllm.data.dataset import SupervisedDataset
from mllm.data.packing import collate_packed
from mllm.data.readers import read_samples
from mllm.model.build import build_mllm
from mllm.model.layout import LLM_DIR, VIQ_DIR
from mllm.train.checkpoint import load_checkpoint_weights, load_exported
from viq.config import PreprocessConfig


def _packed_batch(built, demo) -> dict:
    ds = SupervisedDataset(read_samples(demo["val"]), built.tokenizer, patch_size=16,
                           image=PreprocessConfig(area=64 * 64, multiple=32))
    batch = collate_packed([ds[i] for i in range(3)])
    batch["codes"] = built.code_encoder(batch.pop("pixel_values"))
    return batch


def test_export_merges_lora_and_reloads(demo_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", str(RECIPES / "debug" / "sft_lora.yaml"),
                 *debug_overrides(demo_data, run, "train.max_steps=3")]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / LLM_DIR / "config.json").is_file() and (out / VIQ_DIR / "config.json").is_file()

    # the checkpoint as trained: base + adapters (unmerged), and its merged LLM in memory
    built = build_mllm(load_recipe(run / "mllm_config.yaml"), cuda=False)
    load_checkpoint_weights(built.model, run)
    built.model.eval()
    batch = _packed_batch(built, demo_data)
    with torch.no_grad():
        loss_ckpt = built.model(**batch).loss.item()
    base_logits_ids = torch.arange(5, 60)[None]
    with torch.no_grad():
        with built.model.llm.disable_adapter():
            base_logits = built.model.llm(input_ids=base_logits_ids).logits
    merged = built.model.llm.merge_and_unload().eval()

    plain = AutoModelForCausalLM.from_pretrained(out / LLM_DIR).eval()
    assert type(plain).__name__ == "Qwen2ForCausalLM"  # its base architecture, no peft needed
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        logits_plain = plain(input_ids=base_logits_ids).logits
        logits_merged = merged(input_ids=base_logits_ids).logits
    assert torch.allclose(logits_plain, logits_merged, atol=1e-5)
    assert not torch.allclose(logits_plain, base_logits, atol=1e-4), "the LoRA update must be in the export"

    exported = load_exported(out)
    with torch.no_grad():
        loss_export = exported.model(**_packed_batch(exported, demo_data)).loss.item()
    assert abs(loss_export - loss_ckpt) < 1e-5, (loss_export, loss_ckpt)
