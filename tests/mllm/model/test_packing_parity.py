"""Padding-free packing is exact: one packed row (position_ids restarting per sample, no attention
mask) gives the same loss and gradients as the same samples right-padded with an attention mask,
for Qwen2, Qwen3 and Llama tiny configs, with images (ViQ codes or pixels through the tower).
Negative control: the same row with a plain arange of positions lets samples attend to each other,
and the loss changes."""

from __future__ import annotations

import pytest
import torch

from mllm.config import RecipeConfig
from mllm.data.dataset import SupervisedDataset
from mllm.data.packing import collate_packed, collate_padded
from mllm.data.readers import read_samples
from mllm.model.build import build_mllm
from viq.config import PreprocessConfig
from viq.configio import from_dict

N_SAMPLES = 4
TOL = 1e-5


def recipe(llm: str, visual: str) -> RecipeConfig:
    return from_dict(RecipeConfig, {
        "model": {"llm": llm, "llm_init": "random", "tokenizer": "debug", "tokenizer_init": "random",
                  "visual": visual,
                  "attn_implementation": "sdpa", "dtype": "float32"},
        # everything trains, so that every gradient is compared
        "trainable": {"tower": visual == "continuous", "embedder": visual == "discrete", "projector": True,
                      "llm": "full"},
        "data": {"train": "unused"},
        "train": {"output_dir": "unused"},
    })


def samples(built, demo) -> list[dict]:
    ds = SupervisedDataset(read_samples(demo["train"]), built.tokenizer, patch_size=16,
                           image=PreprocessConfig(area=64 * 64, multiple=32), max_seq_len=256)
    items = [ds[i] for i in range(N_SAMPLES)]
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) > 1, "the samples should differ in length so that padding happens"
    assert all(len(it["pixel_values"]) == 1 for it in items)
    return items


def with_visual(batch: dict, built) -> dict:
    if built.code_encoder is None:
        return batch
    batch = dict(batch)
    batch["codes"] = built.code_encoder(batch.pop("pixel_values"))
    return batch


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("llm", ["debug", "debug-qwen3", "debug-llama"])
@pytest.mark.parametrize("visual", ["discrete", "continuous"])
def test_packed_equals_padded(llm, visual, demo_data):
    built = build_mllm(recipe(llm, visual), cuda=False)
    model = built.model.train()
    items = samples(built, demo_data)
    packed = with_visual(collate_packed(items), built)
    padded = with_visual(collate_padded(items, pad_token_id=built.tokenizer.pad_token_id), built)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert padded["attention_mask"].shape[0] == N_SAMPLES and not bool(padded["attention_mask"].all())

    loss_packed, grads_packed = loss_and_grads(model, packed)
    loss_padded, grads_padded = loss_and_grads(model, padded)
    assert abs(loss_packed - loss_padded) < TOL, (loss_packed, loss_padded)
    assert grads_packed.keys() == grads_padded.keys()
    visual_part = "visual.embedder." if visual == "discrete" else "visual.encoder."
    assert any(n.startswith(visual_part) for n in grads_packed), "the visual input must be trained here"
    for name, g in grads_packed.items():
        diff = (g - grads_padded[name]).abs().max().item()
        assert diff < TOL, f"{name}: gradients differ by {diff}"
    assert any(g.abs().max() > 0 for g in grads_packed.values())

    # negative control: without restarting positions the packed samples see each other
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        no_labels = {k: v for k, v in packed.items() if k != "labels"}
        diff = (model(**dict(no_labels, position_ids=leaky["position_ids"])).logits
                - model(**no_labels).logits).abs().amax(-1)[0]
    first = int(packed["position_ids"][0, 1:].eq(0).nonzero()[0]) + 1  # where the second sample starts
    assert diff[:first].max() < TOL and diff[first:].max() > 1e-3, (diff[:first].max(), diff[first:].max())
