"""viq bench: recipes load, synthetic batches give every mode the same LLM tokens, FLOP counts match the
model, the varlen LLM attention equals SDPA, and a tiny run writes every figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.data.chat import IGNORE_INDEX
from mllm.data.codes import CodeStore
from mllm.data.layout import num_image_tokens
from mllm.model.varlen_attn import register
from mllm.tools import bench_steps as steps
from mllm.tools.bench import (
    BenchConfig,
    SampleMixConfig,
    peak_flops,
    predicted_overhead,
    run_bench,
    summarize,
    variants,
)
from mllm.tools.bench import main as bench_main
from mllm.tools.bench_loader import measure_loader, write_synthetic_codes
from viq.configio import ConfigError, load_config
from viq.tokenizer import ViQTokenizer

REPO = Path(__file__).resolve().parents[3]
BENCH_RECIPES = sorted((REPO / "recipes" / "bench").glob("*.yaml"))
MIX = SampleMixConfig(
    grids=((4, 4), (4, 6), (6, 4), (8, 8)),
    grid_weights=(0.3, 0.3, 0.3, 0.1),
    prompt_tokens=(2, 12),
    answer_tokens=(1, 48),
)


@pytest.mark.parametrize("path", BENCH_RECIPES, ids=[p.name for p in BENCH_RECIPES])
def test_bench_recipes_load(path):
    cfg = load_config(BenchConfig, path)
    assert cfg.presets and set(cfg.modes) <= set(steps.VISUAL_OF_MODE)
    for case in cfg.presets:
        spec = steps.llm_spec(case.llm, cfg.llm_shapes)
        assert spec["hidden_size"] > 0
    with pytest.raises(ConfigError, match="unknown config key warmups"):
        load_config(BenchConfig, path, ["warmups=3"])


def test_recipes_cover_the_paper_cells():
    names = {p.name for p in BENCH_RECIPES}
    assert {"cpu.yaml", "gpu.yaml"} <= names
    gpu = load_config(BenchConfig, REPO / "recipes" / "bench" / "gpu.yaml")
    cells = {(c.llm, c.seq_len) for c in gpu.presets}
    assert {(f"qwen2.5-{s}", n) for s in ("0.5b", "1.5b", "3b", "7b") for n in (4096, 16384)} <= cells
    assert gpu.encoder == "g" and gpu.dtype == "bfloat16"


def test_samples_fill_the_row_exactly():
    for seq_len in (64, 300, 1000):
        samples = steps.synth_samples(MIX, seq_len, np.random.default_rng(seq_len))
        assert sum(s.length for s in samples) == seq_len
        assert all(s.answer >= 1 and s.prompt >= 0 for s in samples)
        assert any(s.grid for s in samples)


def test_every_mode_feeds_the_llm_the_same_tokens():
    samples = steps.synth_samples(MIX, 400, np.random.default_rng(0))
    kw = dict(vocab=500, image_token_id=499, codebook=1000, codes_per_patch=4, patch=16, seed=3)
    items = {k: steps.make_items(samples, k, **kw) for k in ("pixels", "codes", "text")}
    batches = {k: steps.collate(v, packed=True) for k, v in items.items()}
    ids = {k: b["input_ids"] for k, b in batches.items()}
    assert ids["pixels"].shape == ids["codes"].shape == ids["text"].shape == (1, 400)
    assert torch.equal(ids["pixels"], ids["codes"]) and torch.equal(
        batches["pixels"]["labels"], batches["text"]["labels"]
    )
    slots = ids["pixels"] == 499
    assert int(slots.sum()) == sum(num_image_tokens(*s.grid) for s in samples if s.grid)
    assert torch.equal(ids["pixels"][~slots], ids["text"][~slots]) and not (ids["text"] == 499).any()
    assert (batches["text"]["labels"][slots] == IGNORE_INDEX).all()  # image spans are never supervised
    assert torch.equal(batches["pixels"]["cu_seq_lens"], batches["text"]["cu_seq_lens"])
    grids = batches["codes"]["image_grids"].tolist()
    assert [tuple(x.shape) for x in batches["pixels"]["pixel_values"]] == [(3, 16 * h, 16 * w) for h, w in grids]
    assert batches["codes"]["codes"].shape == (sum(4 * h * w for h, w in grids),)
    padded = steps.collate(items["codes"], packed=False)
    assert int(padded["attention_mask"].sum()) == 400


def test_llm_flops_count_the_model_matmuls():
    llm = steps.build_llm(steps.llm_spec("debug", {}), torch.float32, torch.device("cpu"), "sdpa", 0)
    cfg = llm.config
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear))
    lengths = [10, 30]
    attention = 6 * cfg.num_hidden_layers * cfg.hidden_size * (10**2 + 30**2)
    assert steps.llm_train_flops(cfg, lengths) == pytest.approx(6 * linear * 40 + attention)


@pytest.mark.parametrize("lengths", [[5, 700, 400], [3, 9, 1]])
def test_varlen_llm_attention_equals_sdpa(lengths):
    register()
    ref = steps.build_llm(steps.llm_spec("debug", {}), torch.float32, torch.device("cpu"), "sdpa", 0).eval()
    var = steps.build_llm(steps.llm_spec("debug", {}), torch.float32, torch.device("cpu"), "viq_varlen", 0).eval()
    n = sum(lengths)
    ids = torch.randint(4, 2000, (1, n), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(k) for k in lengths])[None]
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    # use_cache=False: with a cache, transformers does not look for packed rows (the packing contract)
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(
            var(input_ids=ids, position_ids=pos, use_cache=False).logits, want, atol=1e-5, rtol=1e-5
        )
        kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
        torch.testing.assert_close(
            var(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits, want, atol=1e-5, rtol=1e-5
        )
        # no leakage: the last packed sample equals that sample run alone
        alone = var(input_ids=ids[:, n - lengths[-1] :], use_cache=False).logits
        torch.testing.assert_close(want[:, n - lengths[-1] :], alone, atol=1e-5, rtol=1e-5)
        rows, mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long), torch.zeros(len(lengths), max(lengths))
        for b, (a, k) in enumerate(zip(np.cumsum([0, *lengths])[:-1], lengths, strict=True)):
            rows[b, :k], mask[b, :k] = ids[0, a : a + k], 1
        got = var(input_ids=rows, attention_mask=mask.long()).logits
        torch.testing.assert_close(
            got[mask.bool()], ref(input_ids=rows, attention_mask=mask.long()).logits[mask.bool()], atol=1e-5, rtol=1e-5
        )


@pytest.mark.smoke
def test_tiny_bench_writes_every_figure(tmp_path):
    cfg = load_config(
        BenchConfig,
        None,
        [
            "presets=[{llm: debug, seq_len: 160}]",
            "encoder=debug",
            "steps=1",
            "warmup=0",
            "device=cpu",
            "data.grids=[[4, 4], [4, 6], [6, 4], [8, 8]]",
            "data.grid_weights=[0.3, 0.3, 0.3, 0.1]",
            "data.prompt_tokens=[2, 12]",
            "data.answer_tokens=[1, 48]",
            "loader_rows=2",
            "loader_workers=0",
            f"out_dir={tmp_path}",
        ],
    )
    result = run_bench(cfg)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["records"] and (tmp_path / "bench.md").is_file() and (tmp_path / "bench.png").stat().st_size > 0
    keys = {"mode", "llm", "seq_len", "packed", "step_time_s", "tokens_per_s", "peak_mem_bytes", "mfu"}
    assert all(keys <= set(r) for r in saved["records"])
    assert {(r["mode"], r["packed"]) for r in saved["records"]} == set(variants(cfg, cfg.presets[0]))
    summary = saved["summary"][0]
    assert {"saving_vs_continuous", "overhead_vs_text_only"} <= set(summary)
    assert summary["saving_vs_continuous"] is not None and summary["overhead_vs_text_only"] is not None
    offline = next(r for r in saved["records"] if r["mode"] == "viq-offline" and r["packed"])
    assert summary["overhead_vs_text_only_predicted"] == pytest.approx(
        offline["embedder_forward_s"] / next(r["step_time_s"] for r in saved["records"] if r["mode"] == "text-only"))
    assert saved["loader"][0]["seq_len"] == 160 and summary["loader_share_of_step"] > 0
    assert "loader share of step" in (tmp_path / "bench.md").read_text()
    # the real assertion: every mode fed the LLM the same tokens, and only the visual work differs
    assert {r["llm_tokens"] for r in result["records"]} == {160}
    by_mode = {(r["mode"], r["packed"]): r for r in result["records"]}
    assert by_mode["text-only", True]["images"] == 0 and by_mode["viq-offline", True]["images"] > 0
    assert by_mode["continuous", False]["computed_tokens"] > 160  # the padded batch computes padding too
    visual = {m: by_mode[m, True]["visual_flops"] for m in ("continuous", "viq-online", "viq-offline")}
    assert visual["viq-offline"] < visual["continuous"] < visual["viq-online"]
    assert all(np.isfinite(r["first_loss"]) for r in result["records"])


def test_packed_and_padded_losses_agree():
    """The bench's packed and padded batches are the same training signal (to 1e-5), through viq_varlen."""
    register()
    tok = ViQTokenizer(steps.tokenizer_config("debug")).eval()
    llm = steps.build_llm(steps.llm_spec("debug", {}), torch.float32, torch.device("cpu"), "viq_varlen", 0)
    bench = steps.build_workbench(tok, llm, lr=1e-5, embedder_trainable=False)
    samples = steps.synth_samples(MIX, 300, np.random.default_rng(1))
    kw = dict(
        vocab=llm.config.vocab_size,
        image_token_id=bench.image_token_id,
        codebook=tok.codebook_size,
        codes_per_patch=4,
        patch=16,
        seed=0,
    )
    items = steps.make_items(samples, "codes", **kw)
    model = bench.models["embedder"].eval()
    with torch.no_grad():
        losses = []
        for packed in (True, False):
            batch = steps.collate(items, packed)
            extra = steps.attention_kwargs(batch, "viq_varlen")
            losses.append(model(**{k: v for k, v in batch.items() if k != "cu_seq_lens"}, **extra).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)


def test_text_only_does_the_llm_work_of_the_visual_modes():
    """text-only is the LLM of viq-offline alone: the same loss as transformers', and the LM head on the same
    rows (the supervised positions, each twice: the chunked loss recomputes its logits in the backward), never on
    every position of the row."""
    tok = ViQTokenizer(steps.tokenizer_config("debug")).eval()
    llm = steps.build_llm(steps.llm_spec("debug", {}), torch.float32, torch.device("cpu"), "sdpa", 0)
    bench = steps.build_workbench(tok, llm, lr=1e-5, embedder_trainable=False)
    samples = steps.synth_samples(MIX, 200, np.random.default_rng(4))
    kw = dict(vocab=llm.config.vocab_size, image_token_id=bench.image_token_id, codebook=tok.codebook_size,
              codes_per_patch=4, patch=16, seed=0)
    batches = {k: steps.collate(steps.make_items(samples, k, **kw), packed=True) for k in ("codes", "text")}
    text = batches["text"]
    common = {"labels": text["labels"], "position_ids": text["position_ids"]}
    with torch.no_grad():  # use_cache=False: with a cache, transformers does not look for packed rows
        want = llm(input_ids=text["input_ids"], use_cache=False, **common).loss
        got = steps.llm_only_loss(llm, text["input_ids"], **common)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rows = {}
    head = llm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows[mode].append(args[0].shape[0]))
    for mode, kind in (("viq-offline", "codes"), ("text-only", "text")):
        rows[mode] = []
        steps.train_step(bench, mode, batches[kind], {})
    head.remove()
    supervised = int((text["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows["text-only"] == rows["viq-offline"] == [supervised, supervised] and supervised < 200


def test_predicted_overhead_is_the_embedder_forward_over_the_text_only_step():
    assert predicted_overhead(2.0, 0.3) == pytest.approx(0.15)
    assert predicted_overhead(None, 0.3) is None and predicted_overhead(2.0, None) is None
    with pytest.raises(ValueError, match="must be positive, got 0"):
        predicted_overhead(0.0, 0.3)


def test_summary_columns_from_step_times():
    cfg = load_config(BenchConfig, None, ["presets=[{llm: debug, seq_len: 100}]", "padded_modes=[]"])
    times = {"continuous": 4.0, "viq-offline": 2.4, "viq-offline-unfolded": 2.6, "text-only": 2.0}
    records = [{"llm": "debug", "seq_len": 100, "mode": m, "packed": True, "step_time_s": t,
                "embedder_forward_s": 0.3 if m == "viq-offline" else None, "visual_flops": 1.0, "llm_flops": 20.0}
               for m, t in times.items()]
    loaders = [{"seq_len": 100, "single": {"row_s": 0.12, "samples_per_s": 50.0}}]
    (s,) = summarize(records, cfg, loaders)
    assert s["saving_vs_continuous"] == pytest.approx(0.4)
    assert s["overhead_vs_text_only"] == pytest.approx(0.2)
    assert s["overhead_vs_text_only_predicted"] == pytest.approx(0.15)
    assert s["overhead_vs_text_only_unfolded"] == pytest.approx(0.3)
    assert s["loader_share_of_step"] == pytest.approx(0.05)
    assert s["embedder_step_flop_share"] == pytest.approx(0.05)
    assert s["saving_vs_continuous_trainable"] is None  # a mode that did not run leaves its column empty
    assert summarize(records, cfg, None)[0]["loader_share_of_step"] is None
    # a report written while the bench is under way: the cells not run yet are left out
    two = load_config(BenchConfig, None, ["presets=[{llm: debug, seq_len: 100}, {llm: debug, seq_len: 200}]"])
    assert [c["seq_len"] for c in summarize(records, two, loaders)] == [100]


def test_loader_only_prints_the_data_path_table(capsys):
    rc = bench_main([str(REPO / "recipes" / "bench" / "gpu.yaml"), "--loader-only", "encoder=debug",
                     "presets=[{llm: debug, seq_len: 120}, {llm: debug2, seq_len: 120}]", "loader_rows=2",
                     "loader_workers=0", "data.grids=[[4, 4], [8, 8]]", "data.grid_weights=[0.5, 0.5]",
                     "data.prompt_tokens=[2, 12]", "data.answer_tokens=[1, 48]"])
    assert rc == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 120 |")]
    assert len(rows) == 1  # one measurement per sequence length, however many LLMs use it


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_peak_flops_by_device_name(name, tflops):
    assert peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_peak_flops_override_and_cpu():
    assert peak_flops("NVIDIA GeForce RTX 4090", 165.0) == 165.0e12
    assert peak_flops(None, 165.0) is None  # no MFU on a CPU


def test_unfolded_mode_is_the_same_model_through_the_unfolded_path(monkeypatch):
    tok = ViQTokenizer(steps.tokenizer_config("debug")).eval()
    llm = steps.build_llm(steps.llm_spec("debug", {}), torch.float32, torch.device("cpu"), "sdpa", 0)
    bench = steps.build_workbench(tok, llm, lr=1e-5, embedder_trainable=False)
    samples = steps.synth_samples(MIX, 200, np.random.default_rng(2))
    items = steps.make_items(samples, "codes", vocab=llm.config.vocab_size, image_token_id=bench.image_token_id,
                             codebook=tok.codebook_size, codes_per_patch=4, patch=16, seed=0)
    batch = steps.collate(items, packed=True)
    model = bench.models["embedder"].eval()
    embedder, folds = tok.head.embedder, []
    fold = embedder.folded_input_map
    monkeypatch.setattr(embedder, "folded_input_map", lambda: folds.append(1) or fold())
    losses = {}
    for mode, n_folds in (("viq-offline-unfolded", 0), ("viq-offline", 1)):
        steps.set_trainable(bench, mode)
        with torch.no_grad():
            losses[mode] = model(**{k: v for k, v in batch.items() if k != "cu_seq_lens"}).loss
        assert len(folds) == n_folds, mode  # the unfolded mode never builds the folded map
    torch.testing.assert_close(losses["viq-offline"], losses["viq-offline-unfolded"], atol=1e-5, rtol=1e-5)
    grids = [s.grid for s in samples if s.grid]
    head, w = tok.cfg.head, tok.cfg.encoder.width
    e, d, n = head.expand, head.code_dim, sum(h * w_ for h, w_ in grids)
    folded = steps.visual_forward_flops(tok.cfg, grids, "embedder")
    unfolded = steps.visual_forward_flops(tok.cfg, grids, "embedder", folded=False)
    assert unfolded - folded == pytest.approx(2.0 * n * (e * d * w + (e * w) ** 2 - e * d * e * w))


def test_loader_shards_hold_the_written_codes_and_the_loader_counts_every_sample(tmp_path):
    samples = [s for seed in range(3) for s in steps.synth_samples(MIX, 120, np.random.default_rng(seed))]
    data, codes = write_synthetic_codes(tmp_path, samples, codebook=1000, codes_per_patch=4, patch=16)
    store = CodeStore(codes)
    with_image = [s for s in samples if s.grid]
    assert len(store) == len(with_image) and len(json.loads(data.read_text())) == len(samples)
    for i, s in enumerate(samples):
        if s.grid:
            got, grid = store[f"images/{i:06d}.png"]
            assert grid == s.grid and got.numel() == 4 * s.grid[0] * s.grid[1] and int(got.max()) < 1000
    result = measure_loader(MIX, 120, rows=3, workers=0, codebook=1000, codes_per_patch=4, patch=16)
    assert result["rows"] >= 3 and result["samples"] > result["rows"]
    assert result["single"]["samples_per_s"] > 0 and result["single"]["row_s"] > 0 and result["workers"] is None
    with pytest.raises(ValueError, match="loader rows must be >= 2"):
        measure_loader(MIX, 120, rows=1)
