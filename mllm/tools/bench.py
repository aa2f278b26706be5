"""``viq bench RECIPE.yaml [key=value ...]``: the training-step speed of each visual input mode, side by side.

Modes (design/performance.md): ``continuous`` (the ViQ encoder without head as a SigLIP2-shaped tower,
frozen, forward only), ``continuous-trainable`` (the tower trained too), ``viq-online`` (encoder + head
in the step, frozen), ``viq-offline`` (stored codes -> code embedder), ``viq-offline-unfolded`` (the same
without the embedder's folded input map, to show what the fold saves), ``text-only`` (the LLM alone).
Each step is a full training step: forward, backward and AdamW on the trainable parts (projector and
the whole LLM; the tower when trainable). Every mode feeds the LLM the same tokens (mllm.tools.bench_steps).

The modes run interleaved in one process (round-robin over steps) so that machine drift hits all of them
alike; warm-up steps are dropped and the median of the timed steps is reported. Each round also times the
code embedder's forward alone, for the predicted ``viq-offline`` step (``text-only`` + that forward), and
each cell times the code-shard data path (mllm.tools.bench_loader) for the loader's share of a step.
Outputs in ``out_dir``, rewritten after every cell so that a run cut short keeps what it measured:
``bench.json`` (``records``, a ``summary`` per llm x seq_len, ``loader`` per cell), ``bench.md`` and
``bench.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mllm.config import resolve_recipe
from mllm.model.varlen_attn import register as register_varlen
from mllm.tools import bench_steps as steps
from mllm.tools.bench_loader import measure_loader
from mllm.tools.bench_report import markdown, markdown_loader, write_report
from viq.configio import load_config, to_dict
from viq.tokenizer import ViQTokenizer

logger = logging.getLogger(__name__)

Mode = Literal["continuous", "continuous-trainable", "viq-online", "viq-offline", "viq-offline-unfolded", "text-only"]
MODES: tuple[str, ...] = ("continuous", "continuous-trainable", "viq-online", "viq-offline", "text-only")

# design/performance.md: full training iteration in seconds, (ViQ, SigLIP2-g), read off the paper's figure
PAPER = {
    ("qwen2.5-0.5b", 4096): (1.45, 2.88),
    ("qwen2.5-0.5b", 16384): (4.44, 14.56),
    ("qwen2.5-1.5b", 4096): (1.70, 3.15),
    ("qwen2.5-1.5b", 16384): (5.89, 16.08),
    ("qwen2.5-3b", 4096): (2.64, 4.11),
    ("qwen2.5-3b", 16384): (8.58, 18.81),
    ("qwen2.5-7b", 4096): (4.73, 6.14),
    ("qwen2.5-7b", 16384): (14.37, 24.62),
}
# dense bf16 tensor-core peaks (SXM parts; the vendors' data sheets), for the MFU column when the recipe gives
# none; the first key found in the device's name wins, so the longer names come first
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass(frozen=True)
class CaseConfig:
    llm: str  # an LLM preset (mllm.model.llm.LLM_PRESETS) or a key of llm_shapes
    seq_len: int  # tokens of the packed row every mode feeds the LLM
    paper_seq_len: int | None = None  # the real length a scaled-down case stands for (paper column)
    padded: bool = True  # also run the padded_modes on padded batches


@dataclass(frozen=True)
class EncoderShape:
    """Resizes the tokenizer preset's encoder and head (null: keep the preset's value)."""

    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_hidden: int | None = None
    head_blocks: int | None = None  # pre, RoPE and post blocks of the quantization head
    rope_dim: int | None = None


@dataclass(frozen=True)
class SampleMixConfig:
    """The synthetic sample mix: patch grids of the images, their weights, and text lengths."""

    grids: tuple[tuple[int, int], ...] = ((24, 24), (24, 32), (32, 24), (32, 32), (48, 48))
    grid_weights: tuple[float, ...] = (0.3, 0.2, 0.2, 0.2, 0.1)
    text_only_fraction: float = 0.1
    prompt_tokens: tuple[int, int] = (8, 64)
    answer_tokens: tuple[int, int] = (4, 512)  # log-uniform


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[CaseConfig, ...]
    encoder: str = "g"  # ViQ tokenizer preset of the visual paths
    encoder_shape: EncoderShape = field(default_factory=EncoderShape)
    llm_shapes: dict = field(default_factory=dict)  # name -> {base: preset, hidden_size: ..., ...}
    modes: tuple[Mode, ...] = MODES
    padded_modes: tuple[Mode, ...] = ("continuous", "viq-offline")  # also run on padded batches
    packed: bool = True
    steps: int = 5
    warmup: int = 2
    device: str = "auto"  # auto: cuda when available
    threads: int | None = None  # CPU intra-op threads (None: torch's default)
    dtype: Literal["float32", "bfloat16"] = "float32"
    llm_attn: Literal["viq_varlen", "sdpa", "flash_attention_2"] = "viq_varlen"
    embedder_trainable: bool = False
    encoder_checkpointing: bool = False  # recompute the trainable tower's activations in the backward pass
    llm_checkpointing: bool = False
    lr: float = 1e-5
    seed: int = 0
    peak_tflops: float | None = None  # for the MFU; default from the GPU's name
    data: SampleMixConfig = field(default_factory=SampleMixConfig)
    loader_rows: int = 8  # packed rows per cell for the data path's throughput (0: not measured)
    loader_workers: int = 2  # DataLoader worker processes of its second measurement (0: in-process only)
    out_dir: str = "runs/bench"

    def __post_init__(self):
        if not self.presets:
            raise ValueError("presets must list at least one {llm, seq_len}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}")
        for c in self.presets:
            if c.seq_len <= 0:
                raise ValueError(f"seq_len must be positive, got {c.seq_len} for {c.llm}")
        if self.loader_rows == 1 or self.loader_rows < 0 or self.loader_workers < 0:
            raise ValueError(f"need loader_rows 0 or >= 2 and loader_workers >= 0, got loader_rows={self.loader_rows}, "
                             f"loader_workers={self.loader_workers}")
        if not self.packed and not (self.padded_modes and all(c.padded for c in self.presets)):
            raise ValueError("nothing to run for some preset: packed is false and it runs no padded mode")


def variants(cfg: BenchConfig, case: CaseConfig) -> list[tuple[str, bool]]:
    """(mode, packed) pairs of a case, in run order."""
    out = [(m, True) for m in cfg.modes] if cfg.packed else []
    return out + ([(m, False) for m in cfg.padded_modes] if case.padded else [])


def _device(cfg: BenchConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named ``device_name`` (PEAK_TFLOPS), or the override; None for a CPU
    (``device_name`` None) or an unknown GPU: no MFU is reported then."""
    if device_name is None:
        return None
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def machine_name(device: torch.device | str | None = None) -> str:
    """What a run ran on, for reports and figure titles: the GPU's name, or the CPU's model, architecture
    and core count (None: the GPU when there is one, else the CPU)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")  # platform.processor() is empty or just the architecture on Linux
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model or 'CPU'} ({platform.machine() or 'unknown architecture'}, {os.cpu_count()} cores)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ run


@dataclass
class Variant:
    """One (mode, packed) of a case, with its batch on the device and its fixed counts."""

    mode: str
    packed: bool
    batch: dict
    attn_kwargs: dict
    counts: dict
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    loss: float | None = None
    embedder_times: list[float] = field(default_factory=list)  # the embedder's forward alone (viq-offline)
    error: str | None = None  # set when the step does not fit in memory; the variant is then skipped


def _build_tokenizer(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> ViQTokenizer:
    tcfg = steps.tokenizer_config(cfg.encoder, **to_dict(cfg.encoder_shape))
    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialise on the device: fast on a GPU
        torch.manual_seed(cfg.seed)
        tok = ViQTokenizer(tcfg)
    tok.encoder.grad_checkpointing = cfg.encoder_checkpointing  # acts only while the tower trains
    return tok.to(device=device, dtype=dtype).eval()


def _prepare(cfg: BenchConfig, case: CaseConfig, bench: steps.Workbench, device, dtype) -> list[Variant]:
    tok, llm_cfg = bench.tokenizer, bench.llm.config
    samples = steps.synth_samples(cfg.data, case.seq_len, np.random.default_rng(cfg.seed))
    lengths = [s.length for s in samples]
    grids = [s.grid for s in samples if s.grid]
    kind_of = {"tower": "pixels", "tower+head": "pixels", "embedder": "codes", None: "text"}
    cache: dict[tuple[str, bool], dict] = {}
    out = []
    for mode, packed in variants(cfg, case):
        if mode not in steps.VISUAL_OF_MODE:
            raise ValueError(f"unknown bench mode {mode!r}; expected one of {list(steps.VISUAL_OF_MODE)}")
        path = steps.VISUAL_OF_MODE[mode]
        kind = kind_of[path]
        if (kind, packed) not in cache:
            items = steps.make_items(
                samples,
                kind,
                vocab=llm_cfg.vocab_size,
                image_token_id=bench.image_token_id,
                codebook=tok.codebook_size,
                codes_per_patch=tok.codes_per_patch,
                patch=tok.cfg.encoder.patch_size,
                seed=cfg.seed,
            )
            cache[kind, packed] = steps.to_device(steps.collate(items, packed), device, dtype)
        batch = cache[kind, packed]
        trained = mode == "continuous-trainable" or (mode.startswith("viq-offline") and cfg.embedder_trainable)
        counts = {
            "llm_tokens": sum(lengths),
            "computed_tokens": int(batch["input_ids"].numel()),  # with the padding of a padded batch
            "samples": len(samples),
            "images": 0 if path is None else len(grids),
            "patches": 0 if path is None else sum(h * w for h, w in grids),
            "llm_flops": steps.llm_train_flops(llm_cfg, lengths),
            "visual_flops": steps.visual_forward_flops(tok.cfg, grids, path, folded=mode != "viq-offline-unfolded")
            * (3 if trained else 1),
        }
        out.append(Variant(mode, packed, batch, steps.attention_kwargs(batch, cfg.llm_attn), counts))
    return out


def _time(variants_: list[Variant], bench: steps.Workbench, cfg: BenchConfig, device: torch.device) -> None:
    """Round-robin over the variants, one step each per round; rounds < warmup are not timed."""
    for r in range(cfg.warmup + cfg.steps):
        for v in (v for v in variants_ if v.error is None):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            try:
                loss = steps.train_step(bench, v.mode, v.batch, v.attn_kwargs)
                _sync(device)
            except torch.OutOfMemoryError:
                # one mode too big for the device must not lose the others' figures: record and go on
                v.error = "out of memory"
                logger.warning("%s (%s) ran out of memory; it is left out", v.mode, "packed" if v.packed else "padded")
                bench.optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            dt = time.perf_counter() - t0
            v.loss = loss if v.loss is None else v.loss
            if r >= cfg.warmup:
                v.times.append(dt)
                if device.type == "cuda":
                    v.peak = max(v.peak or 0, torch.cuda.max_memory_allocated(device))
            if v.mode == "viq-offline" and v.packed:
                t0 = time.perf_counter()
                steps.embedder_forward(bench, v.batch)
                _sync(device)
                if r >= cfg.warmup:
                    v.embedder_times.append(time.perf_counter() - t0)
        logger.info("round %d/%d done", r + 1, cfg.warmup + cfg.steps)


def _record(v: Variant, case: CaseConfig, peak_flops: float | None) -> dict:
    t = statistics.median(v.times) if v.times else None
    return {
        "mode": v.mode,
        "llm": case.llm,
        "seq_len": case.seq_len,
        "packed": v.packed,
        "step_time_s": t,
        "tokens_per_s": None if t is None else v.counts["llm_tokens"] / t,
        "peak_mem_bytes": v.peak,
        "mfu": v.counts["llm_flops"] / t / peak_flops if peak_flops and t else None,
        "embedder_forward_s": statistics.median(v.embedder_times) if v.embedder_times else None,
        **v.counts,
        "step_times_s": v.times,
        "first_loss": v.loss,
        "error": v.error,
    }


def summarize(records: list[dict], cfg: BenchConfig, loaders: list[dict] | None = None) -> list[dict]:
    """Per llm x seq_len with records: the savings and overheads of viq-offline (measured, and predicted as
    text-only + the embedder's forward), what the fold saves, the data path's share of a step, and
    packed-over-padded speed-ups."""
    out = []
    loader_of = {d["seq_len"]: d for d in loaders or ()}
    for case in cfg.presets:
        recs = [r for r in records if r["llm"] == case.llm and r["seq_len"] == case.seq_len]
        if not recs:
            continue  # not run yet: a report written while the bench is under way
        t = {(r["mode"], r["packed"]): r["step_time_s"] for r in recs if r["step_time_s"] is not None}
        off = t.get(("viq-offline", True))

        def ratio(a, b):
            return None if a is None or b is None else a / b

        base = cfg.llm_shapes.get(case.llm, {}).get("base", case.llm)
        paper = PAPER.get((base, case.paper_seq_len or case.seq_len))
        emb = next((r for r in recs if r["mode"] == "viq-offline" and r["packed"]), None)
        text = t.get(("text-only", True))
        loader = loader_of.get(case.seq_len, {}).get("single") or {}
        out.append(
            {
                "llm": case.llm,
                "seq_len": case.seq_len,
                "saving_vs_continuous": _sub1(ratio(off, t.get(("continuous", True))), neg=True),
                "overhead_vs_text_only": _sub1(ratio(off, text)),
                "overhead_vs_text_only_predicted": predicted_overhead(text, emb and emb["embedder_forward_s"]),
                "overhead_vs_text_only_unfolded": _sub1(ratio(t.get(("viq-offline-unfolded", True)), text)),
                "loader_share_of_step": ratio(loader.get("row_s"), off),
                "saving_vs_continuous_trainable": _sub1(ratio(off, t.get(("continuous-trainable", True))), neg=True),
                "saving_vs_viq_online": _sub1(ratio(off, t.get(("viq-online", True))), neg=True),
                "paper_saving": None if paper is None else 1 - paper[0] / paper[1],
                "embedder_step_flop_share": None if emb is None else emb["visual_flops"] / emb["llm_flops"],
                "packed_speedup": {m: ratio(t.get((m, False)), t.get((m, True))) for m in cfg.padded_modes},
            }
        )
    return out


def predicted_overhead(text_only_s: float | None, embedder_forward_s: float | None) -> float | None:
    """``viq-offline`` over ``text-only`` at the limit, minus one: the step costs text-only plus the code
    embedder's own forward, so the overhead is that forward over the text-only step."""
    if text_only_s is None or embedder_forward_s is None:
        return None
    if text_only_s <= 0:
        raise ValueError(f"the text-only step time must be positive, got {text_only_s}")
    return embedder_forward_s / text_only_s


def _sub1(x: float | None, neg: bool = False) -> float | None:
    if x is None:
        return None
    return 1 - x if neg else x - 1


def run_bench(cfg: BenchConfig) -> dict:
    """Run every case and mode of ``cfg``; returns the bench.json content (also written with the report)."""
    device = _device(cfg)
    dtype = getattr(torch, cfg.dtype)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.llm_attn == "viq_varlen":
        register_varlen()
    tok = _build_tokenizer(cfg, device, dtype)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, cfg.peak_tflops)
    result = {
        "device": machine_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": to_dict(cfg),
        "records": [],
        "loader": [],
        "summary": [],
    }
    records, loaders = result["records"], result["loader"]
    for llm_name in dict.fromkeys(c.llm for c in cfg.presets):  # one LLM per name, for all its lengths
        spec = steps.llm_spec(llm_name, cfg.llm_shapes)
        llm = steps.build_llm(spec, dtype, device, cfg.llm_attn, cfg.seed)
        if cfg.llm_checkpointing:  # transformers 5.2x renamed the method; the GPU image may hold an older one
            getattr(llm, "activation_checkpointing_enable", llm.gradient_checkpointing_enable)()
        bench = steps.build_workbench(tok, llm, cfg.lr, cfg.embedder_trainable)
        for case in (c for c in cfg.presets if c.llm == llm_name):
            logger.info("benchmarking %s at %d tokens on %s", case.llm, case.seq_len, device)
            prepared = _prepare(cfg, case, bench, device, dtype)
            _time(prepared, bench, cfg, device)
            records += [_record(v, case, peak) for v in prepared]
            del prepared
            if cfg.loader_rows and all(d["seq_len"] != case.seq_len for d in loaders):
                loaders.append(measure_loader(cfg.data, case.seq_len, rows=cfg.loader_rows, workers=cfg.loader_workers,
                                              codebook=tok.codebook_size, codes_per_patch=tok.codes_per_patch,
                                              patch=tok.cfg.encoder.patch_size, seed=cfg.seed))
            result["summary"] = summarize(records, cfg, loaders)
            write_report(result, Path(cfg.out_dir))
        del bench, llm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    logger.info("wrote %s, bench.md and bench.png\n%s", Path(cfg.out_dir) / "bench.json", markdown(result))
    return result


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """``viq bench RECIPE.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="viq bench",
        description="Time full training steps of each visual input mode (continuous tower, ViQ online, "
        "ViQ offline codes, text only; packed and padded) side by side, and write bench.json, bench.md "
        "and bench.png to out_dir. Example: viq bench recipes/bench/cpu.yaml steps=3 out_dir=runs/bench",
    )
    parser.add_argument("recipe", help="bench recipe YAML (recipes/bench/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=3")
    parser.add_argument("--loader-only", action="store_true",
                        help="time only the code-shard data path at each sequence length of the recipe (no model "
                             "is built; the tokenizer preset's codebook and patch) and print its table")
    args = parser.parse_intermixed_args(argv)  # the flag may stand among the overrides
    cfg = load_config(BenchConfig, resolve_recipe(args.recipe), args.overrides)
    if args.loader_only:
        print(markdown_loader(loader_only(cfg)), end="")
    else:
        run_bench(cfg)
    return 0


def loader_only(cfg: BenchConfig) -> list[dict]:
    """The data path's throughput at every sequence length of ``cfg`` (bench_loader.measure_loader)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tcfg = steps.tokenizer_config(cfg.encoder)
    head = tcfg.head
    if head.quantizer != "fsq":
        raise ValueError(f"encoder {cfg.encoder!r} has no codebook (quantizer {head.quantizer!r}): no codes to load")
    codebook = int(np.prod(head.levels))
    return [measure_loader(cfg.data, n, rows=max(cfg.loader_rows, 2), workers=cfg.loader_workers, codebook=codebook,
                           codes_per_patch=head.expand, patch=tcfg.encoder.patch_size, seed=cfg.seed)
            for n in dict.fromkeys(c.seq_len for c in cfg.presets)]
