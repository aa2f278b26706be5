"""Building from a recipe: which parts train, LoRA placement, optimizer groups, and a short training
run after which frozen parts are bit-identical and trainable ones moved."""

from __future__ import annotations

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides

from mllm.config import load_recipe
from mllm.model.build import build_mllm, part_of
from mllm.train.optim import param_groups
from mllm.train.trainer import calibrate_projector, prepare_trainer


def test_lora_recipe_parts_and_groups(tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_lora.yaml",
                      ["lr.projector=0.01", "lr.llm=0.002", "train.weight_decay=0.1", f"train.output_dir={tmp_path}"])
    built = build_mllm(cfg, cuda=False)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(part_of(n) in ("projector", "llm") for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("llm."))
    assert not any(n.startswith("visual.") for n in trainable)  # the embedder is frozen in this recipe
    groups = {g["name"]: g for g in param_groups(built.model, cfg)}
    assert set(groups) == {"projector", "projector/no_decay", "llm"}
    assert groups["projector"]["lr"] == 0.01 and groups["llm"]["lr"] == 0.002
    assert groups["projector"]["weight_decay"] == 0.1 and groups["projector/no_decay"]["weight_decay"] == 0.0
    # biases and the 1-D newline/begin/end embeddings are not decayed
    no_decay = {id(p) for p in groups["projector/no_decay"]["params"]}
    for name, p in built.model.projector.named_parameters():
        assert (id(p) in no_decay) == (p.ndim < 2), name
    assert built.code_encoder is not None and not any(p.requires_grad for p in built.code_encoder.parameters())


def test_frozen_recipe_rejects_training_nothing(tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "pretrain_projector.yaml",
                      ["trainable.projector=false", f"train.output_dir={tmp_path}"])
    built = build_mllm(cfg, cuda=False)
    with pytest.raises(ValueError, match="trains nothing"):
        param_groups(built.model, cfg)


def test_continuous_tower_and_gradient_checkpointing(tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_lora_continuous.yaml",
                      ["trainable.tower=true", "train.gradient_checkpointing=true", f"train.output_dir={tmp_path}"])
    built = build_mllm(cfg, cuda=False)
    tower = built.model.visual.encoder
    assert tower.grad_checkpointing and built.model.llm.get_base_model().is_activation_checkpointing
    assert all(p.requires_grad for n, p in tower.named_parameters() if not n.startswith("attn_pool."))
    assert not any(p.requires_grad for p in tower.attn_pool.parameters())  # unused by the MLLM
    assert built.code_encoder is None


def test_frozen_parts_bit_identical_trainable_moved(demo_data, tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_lora.yaml",
                      debug_overrides(demo_data, tmp_path, "train.max_steps=3", "train.save_steps=100"))
    trainer = prepare_trainer(cfg)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    for name, old in before.items():
        if name in trainable:
            continue
        assert torch.equal(old, after[name].detach()), f"frozen {name} changed"
    moved = {part_of(n) for n in trainable if not torch.equal(before[n], after[n].detach())}
    assert moved == {"projector", "llm"}
    # every LoRA B matrix left zero, i.e. the LLM actually learnt
    assert all(not torch.equal(before[n], after[n].detach()) for n in trainable if "lora_B" in n)


def test_projector_calibration_on_the_training_codes(demo_data, tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_lora.yaml",
                      debug_overrides(demo_data, tmp_path, "train.max_steps=1", "train.calibration_samples=8"))
    trainer = prepare_trainer(cfg)
    calibrate_projector(trainer, cfg.train.calibration_samples)
    feats, seen = [], 0
    for item in (trainer.train_dataset[i] for i in range(len(trainer.train_dataset))):
        for s in item if isinstance(item, list) else [item]:
            codes = trainer.code_encoder(s["pixel_values"])  # this recipe computes codes in the step
            feats.append(trainer.model.visual(codes=codes, image_grids=s["image_grids"]))
            seen += 1
        if seen >= 8:
            break
    with torch.no_grad():
        y = trainer.model.projector.proj1(torch.cat(feats))
    torch.testing.assert_close(y.mean(0), torch.zeros(y.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(y.shape[1]), atol=1e-3, rtol=0)


def test_building_the_visual_side_leaves_the_tokenizer_as_it_was():
    # CodeEncoder and VisualInput hold the tokenizer's modules; neither replaces or removes any of them
    import torch

    from mllm.model.build import CodeEncoder
    from mllm.model.mllm import VisualInput
    from viq import ViQTokenizer
    from viq.encoder import Encoder

    tok = ViQTokenizer.from_preset("debug", seed=0)
    children = dict(tok.named_modules())
    image = torch.rand(3, 64, 96) * 2 - 1
    codes = tok.encode([image])[0]
    enc = CodeEncoder(tok).to(torch.float64)  # a dtype move of the code encoder must not reach the embedder
    other = Encoder(tok.cfg.encoder)
    visual = VisualInput(tok, "continuous", encoder=other)
    assert dict(tok.named_modules()).keys() == children.keys()
    assert all(children[k] is m for k, m in tok.named_modules())
    assert tok.head.embedder.project_out.weight.dtype == torch.float32
    assert visual.encoder is other and tok.encoder is children["encoder"]
    assert torch.equal(enc([image.double()]), codes.indices)


def test_lora_adapters_are_seeded_by_the_recipe(demo_data, tmp_path):
    # lora_B starts at zero, so an unseeded lora_A changes nothing at step 1 and everything from step 2 on
    pytest.importorskip("peft")
    cfg = load_recipe(RECIPES / "debug" / "sft_lora.yaml", debug_overrides(demo_data, tmp_path))
    states = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever the global generator holds before the build
        llm = build_mllm(cfg, cuda=False).model.llm
        states.append({n: p.detach().clone() for n, p in llm.named_parameters() if "lora_A" in n})
    assert states[0] and states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    other = load_recipe(RECIPES / "debug" / "sft_lora.yaml", debug_overrides(demo_data, tmp_path, "train.seed=7"))
    llm = build_mllm(other, cuda=False).model.llm
    assert not all(torch.equal(p, states[0][n]) for n, p in llm.named_parameters() if "lora_A" in n)
