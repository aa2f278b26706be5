"""The ViQ tokenizer stages (mllm.stages): the distillation target, one tower forward per step, frozen vs
trained parts, the debug chain 1 -> 2-1 -> 2-2 -> decoder through `viq train`, and the meta-device dry run
of the real-scale recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides, read_log
from safetensors.torch import load_file

from mllm.cli import main
from mllm.config import load_recipe
from mllm.data.packing import collate_packed
from mllm.model.layout import LLM_DIR, VIQ_DIR, VISUAL_WEIGHTS
from mllm.stages.areas import area_phases
from mllm.stages.llm_stage import build_stage_model
from mllm.stages.metrics import StageMetrics, codebook_stats
from mllm.stages.report import REPORT_FILE
from mllm.stages.run import dry_run, run_chain
from mllm.train.data_setup import build_datasets
from mllm.train.trainer import prepare_trainer
from viq.configio import ConfigError
from viq.tokenizer import ViQTokenizer

TOK = RECIPES / "tokenizer"
# re-initialised entering 2-2: the code-width tensors, and the head-wise RoPE block the proximal head lacks
CHANGED = sorted(["head.embedder.codebook", "head.embedder.project_out.weight", "head.project_in.bias",
                  "head.project_in.weight"] + [f"head.rope_blocks.0.{name}.{p}" for name in (
                      "norm1", "attn.decrease_dim", "attn.qkv", "attn.proj", "attn.increase_dim", "norm2",
                      "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")])


def stage_cfg(name: str, demo, out: Path, *extra: str):
    return load_recipe(TOK / "debug" / f"{name}.yaml", debug_overrides(demo, out, *extra))


def counting(monkeypatch, module, calls: list):
    """Record the patch grids of every ``forward_packed`` call of an encoder."""
    original = module.forward_packed

    def wrapped(patches, grids, cu, max_len):
        calls.append(list(grids))
        return original(patches, grids, cu, max_len)

    monkeypatch.setattr(module, "forward_packed", wrapped)


def test_distillation_target(demo_data, tmp_path, monkeypatch):
    model = build_stage_model(stage_cfg("stage1", demo_data, tmp_path), cuda=False).model.eval()
    teacher_grids: list = []
    counting(monkeypatch, model.teacher.encoder, teacher_grids)

    def distill(image: torch.Tensor) -> float:
        model.visual(pixel_values=[image])
        trace, model.visual.trace = model.visual.trace, None
        return float(model.aux_terms(trace, [image])["distill_loss"].detach())

    gen = torch.Generator().manual_seed(0)
    # same weights and the teacher's own resolution (64): student == teacher
    assert distill(torch.rand(3, 64, 64, generator=gen) * 2 - 1) < 1e-6
    assert distill(torch.rand(3, 64, 128, generator=gen) * 2 - 1) > 1e-4
    assert teacher_grids == [[(4, 4)], [(4, 4)]]  # the teacher always sees 64 x 64


def test_one_tower_forward_per_step(demo_data, tmp_path, monkeypatch):
    cfg = stage_cfg("stage2_1_proximal", demo_data, tmp_path, "stage.init=debug")
    built = build_stage_model(cfg, cuda=False)
    model = built.model
    train_ds, _, _ = build_datasets(cfg, built.tokenizer, model.visual.patch_size)
    batch = collate_packed([train_ds[0]])
    student, teacher = [], []
    counting(monkeypatch, model.visual.encoder, student)
    counting(monkeypatch, model.teacher.encoder, teacher)
    out = model(**batch)
    assert len(student) == 1 and len(teacher) == 1
    assert out.distill_loss > 0 and out.recon_loss > 0
    st = cfg.stage
    assert out.feat_rec_loss > 0
    expected = (out.lm_loss + st.distill_weight * out.distill_loss + st.recon_weight * out.recon_loss
                + st.feat_rec_weight * out.feat_rec_loss)
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert model.decoder.out_conv.weight.grad.abs().sum() > 0
    assert model.visual.encoder.attn_pool.q.weight.grad.abs().sum() > 0  # the student MAP trains


def test_frozen_parts_stay_and_trained_parts_move(demo_data, tmp_path):
    cfg = stage_cfg("stage2_2_fsq", demo_data, tmp_path, "stage.init=debug", "train.max_steps=3",
                    "train.logging_steps=1", "trainable.tower=false")
    trainer = prepare_trainer(cfg, build=build_stage_model, phases=area_phases(cfg))
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("teacher.", "visual.encoder."))
              or (k.startswith("llm.") and "lora_" not in k)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for prefix in ("visual.head.", "decoder.", "projector.", "llm."):
        moved = [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
        assert moved, f"nothing under {prefix} trained"
    assert all("lora_" in k for k in before if k.startswith("llm.") and not torch.equal(before[k], after[k]))


@pytest.fixture(scope="module")
def chain(demo_data, tmp_path_factory) -> Path:
    """The debug chain through the CLI, in-process, with few steps."""
    root = tmp_path_factory.mktemp("chain")
    steps = {"stage1": 4, "stage2_1_proximal": 4, "stage2_2_fsq": 6, "decoder": 30}
    previous = None
    for name, n in steps.items():
        extra = [f"train.max_steps={n}", "train.logging_steps=2"]
        if previous is not None:
            extra.append(f"stage.init={previous}")
        if name == "decoder":
            extra += ["train.logging_steps=5", "train.per_device_batch_size=4"]
        recipe = str(TOK / "debug" / f"{name}.yaml")
        assert main(["train", recipe, *debug_overrides(demo_data, root / name, *extra)]) == 0
        previous = root / name
    return root


METRICS = {"stage1": ("lm_loss", "distill_loss", "distill_cos"),
           "stage2_1_proximal": ("lm_loss", "distill_loss", "recon_loss", "recon_psnr"),
           "stage2_2_fsq": ("lm_loss", "distill_cos", "recon_psnr", "codebook_usage", "code_perplexity"),
           "decoder": ("recon_loss", "recon_psnr", "recon_psnr_mean_colour", "codebook_usage", "code_stability")}


@pytest.mark.parametrize("name", list(METRICS))
def test_chain_stage_outputs(chain, name):
    out = chain / name
    records = read_log(out)
    for key in METRICS[name]:
        assert any(key in rec for rec in records), f"{name} logged no {key}"
    tok = ViQTokenizer.from_pretrained(out / VIQ_DIR)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["kind"] == load_recipe(TOK / "debug" / f"{name}.yaml").stage.kind
    assert report["final_metrics"]
    if name == "stage2_2_fsq":
        assert report["key_map"]["reinitialised"] == CHANGED
        assert any("code_stability" in rec for rec in records)
    if name in ("stage2_2_fsq", "decoder"):
        codes = tok.encode([torch.rand(3, 64, 96) * 2 - 1])
        assert codes[0].indices.numel() == 4 * 6 * 4


def test_decoder_stage_trains_the_decoder_only(chain):
    losses = [rec["recon_loss"] for rec in read_log(chain / "decoder")]
    assert losses[-1] < losses[0]
    fsq = ViQTokenizer.from_pretrained(chain / "stage2_2_fsq" / VIQ_DIR).state_dict()
    final = ViQTokenizer.from_pretrained(chain / "decoder" / VIQ_DIR).state_dict()
    assert all(torch.equal(v, final[k]) for k, v in fsq.items() if not k.startswith("decoder."))
    assert any(not torch.equal(v, final[k]) for k, v in fsq.items() if k.startswith("decoder."))


def test_decoder_stage_refuses_a_proximal_tokenizer(chain, demo_data, tmp_path):
    with pytest.raises(ValueError, match="FSQ quantizer"):
        main(["train", str(TOK / "debug" / "decoder.yaml"),
              *debug_overrides(demo_data, tmp_path, f"stage.init={chain / 'stage2_1_proximal'}")])


def test_run_chain_with_a_perceptual_term(chain, demo_data, tmp_path):
    perceptual = tmp_path / "perc.py"
    perceptual.write_text("def l1(pred, target):\n    return (pred - target).abs().mean()\n")
    root = tmp_path / "chain"
    overrides = debug_overrides(demo_data, tmp_path / "unused", f"stage.init={chain / 'stage2_1_proximal'}",
                                "train.max_steps=2", "train.logging_steps=1", f"stage.perceptual={perceptual}:l1")
    product = run_chain([TOK / "debug" / "stage2_2_fsq.yaml", TOK / "debug" / "decoder.yaml"], overrides, root=root)
    assert product == root / "decoder" / VIQ_DIR and (product / "model.safetensors").is_file()
    assert json.loads((root / "decoder" / REPORT_FILE).read_text())["init"] == str(root / "stage2_2_fsq")
    for name in ("stage2_2_fsq", "decoder"):
        assert any(rec.get("perceptual_loss", 0) > 0 for rec in read_log(root / name)), name


def test_llm_from_init_continues_a_full_llm_and_the_projector(demo_data, tmp_path):
    """A stage that trained the whole LLM (one started from random weights) hands it on, not a new one."""
    s1 = tmp_path / "s1"
    assert main(["train", str(TOK / "debug" / "stage1.yaml"),
                 *debug_overrides(demo_data, s1, "train.max_steps=2", "trainable.llm=full")]) == 0
    extra = (f"stage.init={s1}", "trainable.llm=full")
    model = build_stage_model(stage_cfg("stage2_1_proximal", demo_data, tmp_path / "s21", *extra,
                                        "stage.llm_from_init=true"), cuda=False).model
    llm, saved = model.llm.state_dict(), load_file(str(s1 / LLM_DIR / "model.safetensors"))
    assert saved and all(torch.equal(llm[k], v) for k, v in saved.items())
    projector = model.projector.state_dict()
    stage1 = {k.removeprefix("projector."): v for k, v in load_file(str(s1 / VISUAL_WEIGHTS)).items()
              if k.startswith("projector.")}
    assert stage1.keys() == projector.keys() and all(torch.equal(projector[k], v) for k, v in stage1.items())
    fresh = build_stage_model(stage_cfg("stage2_1_proximal", demo_data, tmp_path / "s21", *extra),
                              cuda=False).model
    assert not torch.equal(fresh.projector.proj1.weight, model.projector.proj1.weight)
    assert not torch.equal(fresh.llm.lm_head.weight, model.llm.lm_head.weight)


def test_llm_from_init_merges_a_lora_stage(demo_data, tmp_path):
    s1 = tmp_path / "s1"
    recipe = str(TOK / "debug" / "stage1.yaml")
    assert main(["train", recipe, *debug_overrides(demo_data, s1, "train.max_steps=2")]) == 0
    adapter = load_file(str(s1 / LLM_DIR / "adapter_model.safetensors"))
    extra = (f"stage.init={s1}", "trainable.llm=frozen")  # no new adapter on top, to read the merged weights
    cfg = stage_cfg("stage2_1_proximal", demo_data, tmp_path / "s21", *extra, "stage.llm_from_init=true")
    merged = build_stage_model(cfg, cuda=False).model.llm.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    base = build_stage_model(stage_cfg("stage2_1_proximal", demo_data, tmp_path / "s21", *extra),
                             cuda=False).model.llm
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    lora = load_recipe(TOK / "debug" / "stage1.yaml").lora
    delta = adapter[name.format("B")] @ adapter[name.format("A")] * (lora.alpha / lora.r)
    assert delta.abs().max() > 0  # two steps moved B off its zero start
    torch.testing.assert_close(merged - base.state_dict()["model.layers.0.self_attn.q_proj.weight"], delta)


def test_llm_from_init_needs_an_llm_stage(chain, demo_data, tmp_path):
    cfg = stage_cfg("stage2_2_fsq", demo_data, tmp_path, f"stage.init={chain / 'decoder'}", "stage.llm_from_init=true")
    with pytest.raises(ValueError, match="llm_from_init needs stage.init to be a finished LLM stage"):
        build_stage_model(cfg, cuda=False)
    with pytest.raises(ConfigError, match="calibrate_projector"):
        stage_cfg("stage2_2_fsq", demo_data, tmp_path, "train.calibrate_projector=true", "stage.llm_from_init=true")


# millions of parameters as the reference's (viq-reference.md §2.2, §9): g backbone 1,160M + MAP 28M, low head
# 277M of which the FSQ stage's head-wise RoPE blocks are 59.8M (absent from the proximal head, as its
# FakeQuantizer), reconstruction adapter 90M (+ the 1536 -> 64 output conv)
REFERENCE_M = {"g": {"tower": 1188, "stage2_2_fsq": 277.0, "rope": 59.8, "decoder": 90.6},
               "so400m": {"tower": 446.5}}


@pytest.mark.parametrize("size, name", [("so400m", "stage1"), ("so400m", "stage2_2_fsq"), ("g", "stage1"),
                                        ("g", "stage2_1_proximal"), ("g", "stage2_2_fsq")])
def test_real_scale_dry_run(size, name):
    counts = dry_run(load_recipe(TOK / size / f"{name}.yaml"))
    ref = REFERENCE_M[size]
    assert counts["tower"] / 1e6 == pytest.approx(ref["tower"], abs=0.5)
    # the original SigLIP2-384 teacher keeps its 24 x 24 table; the student's is resampled to 128 x 128
    width = {"g": 1536, "so400m": 1152}[size]
    assert counts["tower"] - counts["teacher"] == (128 ** 2 - 24 ** 2) * width
    assert 4.9e8 < counts["llm"] < 5.4e8 and 0 < counts["trainable/llm"] < 0.1 * counts["llm"]  # DoRA only
    if name != "stage1":
        assert counts["trainable/head"] > 0 and counts["trainable/decoder"] > 0
    if size == "g" and name == "stage2_2_fsq":
        assert counts["head"] / 1e6 == pytest.approx(ref["stage2_2_fsq"], abs=0.5)
        assert counts["decoder"] / 1e6 == pytest.approx(ref["decoder"], abs=0.5)
    if size == "g" and name == "stage2_1_proximal":  # the same head without the head-wise RoPE blocks
        head_22 = ref["stage2_2_fsq"] - ref["rope"]
        assert counts["head"] / 1e6 == pytest.approx(head_22, abs=0.5)


@pytest.mark.parametrize("override, key", [
    ("stage.recon_weight=1.0", "stage.recon_weight"),  # stage 1 has no head to reconstruct from
    ("model.use_head=true", "model.use_head"),
    ("stage.levels=[8,5,5]", "stage.levels"),
    ("stage.area_range=[100,10]", "stage.area_range"),
    ("stage.llm_from_init=true", "stage.llm_from_init"),  # stage 1 has no init stage to continue
    ("stage.head_position=none", "stage.head_position"),  # nor a head
    ("stage.proximal_rope_blocks=true", "stage.proximal_rope_blocks"),
])
def test_bad_stage_settings_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(TOK / "debug" / "stage1.yaml", [override])


def test_area_sampling_and_metrics(demo_data, tmp_path):
    from mllm.data.readers import read_samples

    cfg = stage_cfg("stage1", demo_data, tmp_path)
    samples = list(read_samples(demo_data["train"]))[:20]
    [phase] = area_phases(cfg)
    areas = [ref.resize for s in phase.transform(samples) for ref in s.images]
    assert areas == [ref.resize for s in phase.transform(samples) for ref in s.images]  # seeded
    assert all(2048 <= a <= 8192 for a in areas) and len(set(areas)) > 10
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), 8)
    assert stats["codebook_usage"] == 0.25 and stats["code_perplexity"] == pytest.approx(2.0)
    metrics = StageMetrics(window=2, codebook_size=8)
    for i in range(3):
        metrics.add(recon_loss=torch.tensor(0.04))
        metrics.add_codes(torch.tensor([i]))
    out = metrics.pop()
    assert out["recon_psnr"] == pytest.approx(20.0) and out["codebook_usage"] == 0.25  # window: codes 1, 2
    assert metrics.pop() == {"codebook_usage": 0.25, "code_perplexity": pytest.approx(2.0)}
