"""A batch without images runs the visual path on a dummy image, so that every rank runs (and, under ZeRO-3,
gathers) the same modules in the same order; the dummy contributes exactly nothing."""

from __future__ import annotations

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides

from mllm.config import load_recipe
from mllm.model.build import build_mllm


@pytest.mark.parametrize("visual", ["discrete", "continuous"])
def test_text_only_batch_runs_the_visual_modules_and_changes_nothing(visual, demo_data, tmp_path):
    extra = ["trainable.tower=true"] if visual == "continuous" else ["trainable.embedder=true"]
    cfg = load_recipe(RECIPES / "debug" / "sft_full.yaml",
                      debug_overrides(demo_data, tmp_path, f"model.visual={visual}", *extra))
    model = build_mllm(cfg, cuda=False).model.train()
    ran: list[str] = []
    for name, module in (("visual", model.visual), ("projector", model.projector)):
        module.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    ids = torch.randint(10, 200, (1, 24))
    labels = ids.clone()
    out = model(input_ids=ids, labels=labels, position_ids=torch.arange(24)[None])
    assert ran == ["visual", "projector"]
    with torch.no_grad():
        plain = model.llm(inputs_embeds=model.llm.get_input_embeddings()(ids), labels=labels,
                          position_ids=torch.arange(24)[None], use_cache=False)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(24)[None]).logits
    assert torch.equal(logits, plain.logits)
    out.loss.backward()
    visual_params = [p for m in (model.visual, model.projector) for p in m.parameters() if p.requires_grad]
    assert visual_params and all(p.grad is not None and not p.grad.any() for p in visual_params)
    assert model.visual.trace is None
