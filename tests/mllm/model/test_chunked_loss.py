"""The training loss over the supervised positions only, in chunks (mllm.model.loss), equals transformers'
loss on the full logits, in value and gradient, with and without the Trainer's num_items_in_batch."""

from __future__ import annotations

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides

from mllm.config import load_recipe
from mllm.data.packing import collate_packed
from mllm.model import loss as loss_module
from mllm.model.build import build_mllm
from mllm.train.data_setup import build_datasets


@pytest.mark.parametrize("recipe", ["sft_full", "sft_lora"])
@pytest.mark.parametrize("with_items", [False, True])
def test_chunked_loss_equals_the_full_logits_loss(recipe, with_items, demo_data, tmp_path, monkeypatch):
    cfg = load_recipe(RECIPES / "debug" / f"{recipe}.yaml", debug_overrides(demo_data, tmp_path))
    built = build_mllm(cfg, cuda=False)
    model = built.model.train()
    ds, _, _ = build_datasets(cfg, built.tokenizer, model.visual.patch_size, viq_identity=built.viq_identity)
    batch = collate_packed([ds[0], ds[1]])
    if built.code_encoder is not None:
        batch["codes"] = built.code_encoder(batch.pop("pixel_values"))
    items = {"num_items_in_batch": torch.tensor(97)} if with_items else {}
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)  # several chunks and a ragged last one
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params)

    torch.manual_seed(0)  # the same LoRA dropout masks in both forwards
    chunked = model(**batch, **items).loss
    assert chunked.shape == () and torch.isfinite(chunked)
    got = grads(chunked)
    torch.manual_seed(0)
    embeds = model.embed_inputs(batch["input_ids"], codes=batch.get("codes"), image_grids=batch["image_grids"])
    plain = model.llm(inputs_embeds=embeds, labels=batch["labels"], position_ids=batch["position_ids"],
                      use_cache=False, **items).loss
    want = grads(plain)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item())


def test_without_labels_the_logits_are_returned(demo_data, tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_full.yaml", debug_overrides(demo_data, tmp_path))
    model = build_mllm(cfg, cuda=False).model.eval()
    ids = torch.randint(10, 200, (1, 12))
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=torch.arange(12)[None])
    assert out.logits.shape == (1, 12, model.llm.config.vocab_size) and out.loss is None


def test_the_lm_head_runs_once_without_supervised_tokens_and_once_in_all_when_partitioned():
    # every rank calls the head the same number of times (DDP, and ZeRO-3's recorded module order)
    from mllm.model.loss import supervised_lm_loss

    head = torch.nn.Linear(8, 11)
    calls: list[int] = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    hidden = torch.randn(1, 40, 8, requires_grad=True)
    none = torch.full((1, 40), -100)
    loss = supervised_lm_loss(hidden, head, none, num_items_in_batch=torch.tensor(5), chunk_tokens=7)
    loss.backward()
    assert loss.item() == 0.0 and calls[0] == 0 and head.weight.grad is not None
    calls.clear()
    labels = torch.randint(0, 11, (1, 40))
    with torch.no_grad():
        chunked = supervised_lm_loss(hidden, head, labels, chunk_tokens=7)
        assert len(calls) == 6  # 39 supervised positions in chunks of 7
        head.weight.ds_id = 0  # as DeepSpeed marks a partitioned weight
        calls.clear()
        whole = supervised_lm_loss(hidden, head, labels, chunk_tokens=7)
    assert calls == [39] and whole.item() == pytest.approx(chunked.item(), rel=1e-6)
