"""The Python steps of scripts/gpu_check.sh (run that script; its header says what each step checks).

    python scripts/gpu_check.py preflight OUT_DIR [--require-cuda]
    python scripts/gpu_check.py attention OUT_DIR --device cuda|cpu [--tokens N]
    python scripts/gpu_check.py train OUT_DIR --device cuda|cpu --work DIR [--steps N] [--samples N]

Each step prints what it found and writes OUT_DIR/<step>.json; it exits 1 when its check fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "debug" / "sft_lora.yaml"
# module -> (distribution, what needs it); every one is on the GPU machine of design/environment.md
REQUIRED = {
    "torch": ("torch", "everything"),
    "transformers": ("transformers", "the LLMs and the Trainer"),
    "accelerate": ("accelerate", "the Trainer"),
    "peft": ("peft", "LoRA (the [train] extra)"),
    "numpy": ("numpy", "everything"),
    "PIL": ("pillow", "images"),
    "yaml": ("pyyaml", "recipes"),
    "safetensors": ("safetensors", "checkpoints"),
    "tokenizers": ("tokenizers", "text tokenizers"),
    "tqdm": ("tqdm", "progress bars"),
    "pyarrow": ("pyarrow", "code shards"),
    "matplotlib": ("matplotlib", "bench.png"),
    "pytest": ("pytest", "the gpu-marked tests"),
}
# module -> (distribution, extra, what runs without it); all absent on that machine
OPTIONAL = {
    "deepspeed": ("deepspeed", "train", "ZeRO recipes (train.deepspeed); without it: the plain Trainer (one GPU, DDP)"),
    "datasets": ("datasets", "train", "save_to_disk data sets; without it: json, jsonl, parquet and tar readers"),
    "flash_attn": ("flash-attn", "flash", "the flash-attn kernels; without it: torch's varlen kernel (torch >= 2.9)"),
    "wandb": ("wandb", "train", "report_to wandb; without it: jsonl and tensorboard logs"),
}
HOW_TO_SUPPLY = ("put its wheel (and any of its own missing dependencies) into the wheel folder, $VIQ_WHEELS "
                 "(default wheels/), and run scripts/gpu_check.sh again: it installs them without a network "
                 "(the script's header says how to fill the folder); with a network: pip install {dist}")


def _version(module: str, dist: str, load: bool = True) -> str | None:
    """The installed version, None when absent; ``load`` imports it (a broken install counts as absent),
    else only finds it (importing deepspeed alone takes many seconds)."""
    try:
        if load:
            importlib.import_module(module)
        elif importlib.util.find_spec(module) is None:
            return None
    except ImportError:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _write(out: Path, step: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{step}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ preflight


def preflight(out: Path, require_cuda: bool) -> int:
    packages = {m: _version(m, d) for m, (d, _) in REQUIRED.items()}
    missing = [m for m, v in packages.items() if v is None]
    report = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": packages,
              "optional": {m: _version(m, d, load=False) for m, (d, _, _) in OPTIONAL.items()}, "missing": missing}
    print(f"python {report['python']} on {report['platform']}")
    for m, v in packages.items():
        print(f"  {m:13s} {v or 'MISSING'}")
    for m, (_, extra, without) in OPTIONAL.items():
        v = report["optional"][m]
        print(f"  {m:13s} {v or 'absent'}" + ("" if v else f"  (optional, viq[{extra}]: {without})"))
    for m in missing:
        dist, why = REQUIRED[m]
        print(f"MISSING {m} (pip package {dist}, needed for {why}): " + HOW_TO_SUPPLY.format(dist=dist))
    ok = not missing
    if "torch" not in missing:
        import torch

        cuda = torch.cuda.is_available()
        report["torch_cuda"] = torch.version.cuda
        report["cuda_available"] = cuda
        if cuda:
            props = torch.cuda.get_device_properties(0)
            report["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {report.get('device', 'none (CPU)')}")
        if require_cuda and not cuda:
            print("FAIL: no CUDA device visible to torch (use --cpu-dry-run on a machine without one)")
            ok = False
        if "transformers" not in missing:
            from mllm.config import resolve_attention
            from viq import attention

            dev = "cuda" if cuda else "cpu"
            report["viq_attention_backends"] = attention.available_backends(dev, torch.bfloat16 if cuda else None)
            report["llm_attention_auto"] = resolve_attention("auto", cuda)
            report["torch_varlen_available"] = attention.HAS_TORCH_VARLEN
            print(f"ViQ encoder attention backends on {dev}: {report['viq_attention_backends']} "
                  f"(torch varlen kernel {'present' if attention.HAS_TORCH_VARLEN else 'absent: torch < 2.9'}); "
                  f"recipes' model.attn_implementation=auto -> {report['llm_attention_auto']}")
    _write(out, "preflight", report)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------ attention


def _segments_sdpa(q, k, v, *, lengths, causal):
    """Per-segment SDPA in a loop: the oracle (and, in bf16, what the fused kernel is held to)."""
    import torch
    import torch.nn.functional as F

    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        start += n
        outs.append(F.scaled_dot_product_attention(*(t[sl].transpose(0, 1) for t in (q, k, v)),
                                                   is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


def _timed(fn, device, reps: int) -> float:
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _grads(fn, inputs, weight, dtype):
    """fn's output and the gradients of sum(out * weight) for ``inputs`` cast to ``dtype``, all in fp32."""
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out.float() * weight).sum().backward()
    return out.detach().float(), [t.grad.float() for t in leaves]


def _max_err(a, b) -> float:
    (out_a, grads_a), (out_b, grads_b) = a, b
    return max(float((x - y).abs().max()) for x, y in zip([out_a, *grads_a], [out_b, *grads_b], strict=True))


def _attention_case(name, lengths, causal, heads, dim, device, dtype, gen) -> list[dict]:
    import functools

    import torch

    from viq.attention import available_backends, cu_seqlens_from_lengths, varlen_attention

    n = sum(lengths)
    inputs = [torch.randn(n, heads, dim, generator=gen).to(device) for _ in range(3)]
    weight = torch.randn(n, heads, dim, generator=gen).to(device)
    cu = cu_seqlens_from_lengths(lengths, device=device)
    segments = functools.partial(_segments_sdpa, lengths=lengths, causal=causal)
    ref = _grads(segments, inputs, weight, torch.float32)
    sdpa_err = _max_err(_grads(segments, inputs, weight, dtype), ref)
    reps = 5 if device == "cuda" else 1
    leaves = [t.to(dtype).requires_grad_() for t in inputs]

    def fwd_bwd(fn):
        return _timed(lambda: (fn(*leaves).float() * weight).sum().backward(), device, reps)

    out = []
    for backend in available_backends(device, dtype):
        run = functools.partial(varlen_attention, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal,
                                backend=backend)
        err = _max_err(_grads(run, inputs, weight, dtype), ref)
        # bf16 rounding of the output alone is 2^-8 relative; a wrong mask or boundary is O(1)
        passed = err <= 2 * sdpa_err + (2e-2 if dtype == torch.bfloat16 else 1e-5)
        rec = {"case": name, "backend": backend, "dtype": str(dtype), "tokens": n, "segments": len(lengths),
               "heads": heads, "head_dim": dim, "causal": causal, "max_err_vs_fp32": err,
               "sdpa_same_dtype_max_err_vs_fp32": sdpa_err, "passed": passed,
               "fwd_bwd_s": fwd_bwd(run), "per_segment_sdpa_fwd_bwd_s": fwd_bwd(segments)}
        out.append(rec)
        times = (f"fwd+bwd {rec['fwd_bwd_s'] * 1e3:.2f} ms, "
                 f"per-segment sdpa {rec['per_segment_sdpa_fwd_bwd_s'] * 1e3:.2f} ms")
        print(f"{name:8s} {backend:12s} {n:6d} tokens in {len(lengths):3d} segments: max err {err:.2e} "
              f"(sdpa in {dtype}: {sdpa_err:.2e}) {'ok' if passed else 'FAIL'}; {times}")
    return out


def attention(out: Path, device: str, tokens: int) -> int:
    """Each varlen backend in bf16 (fp32 on a CPU) against per-segment SDPA: outputs and input gradients
    held to the error SDPA itself makes in that dtype against fp32, on an LLM row (causal, Qwen2.5-0.5B
    heads) and on packed images (bidirectional, SigLIP2-g heads); then forward+backward times."""
    import numpy as np
    import torch

    from mllm.tools import bench_steps
    from mllm.tools.bench import SampleMixConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    llm_lengths = [s.length for s in bench_steps.synth_samples(SampleMixConfig(), tokens, np.random.default_rng(0))]
    image_lengths = [576, 768, 1024, 2304, 576] if device == "cuda" else [16, 24, 64, 12]
    gen = torch.Generator().manual_seed(0)
    results = _attention_case("llm row", llm_lengths, True, 14, 64, device, dtype, gen)
    results += _attention_case("images", image_lengths, False, 16, 96, device, dtype, gen)
    ok = all(r["passed"] for r in results)
    _write(out, "attention", {"device": device, "results": results, "passed": ok})
    return 0 if ok else 1


# ------------------------------------------------------------------------------------ training


def train(out: Path, device: str, work: Path, steps: int, samples: int) -> int:
    """LoRA training of the debug recipe from codes: demo data, a seeded debug ViQ tokenizer, `viq extract`,
    then `viq train debug/sft_lora data.codes=...` for ``steps`` steps on one device, without DeepSpeed."""
    import torch

    from mllm.cli import main as viq
    from mllm.demo.data import generate_demo
    from mllm.tools.extract import extract
    from viq import ViQTokenizer

    if (device == "cuda") != torch.cuda.is_available():
        print(f"FAIL: --device {device} but CUDA available is {torch.cuda.is_available()}")
        return 1
    t0 = time.perf_counter()
    data = generate_demo(work / "demo", n_train=samples, n_val=2, n_test=2, seed=0)
    tok_dir = work / "tokenizer"
    ViQTokenizer.from_preset("debug", seed=0).save_pretrained(tok_dir)
    codes = work / "codes"
    manifest = extract(str(tok_dir), data["train"], codes, preprocess={"area": 4096, "multiple": 32},
                       device=device, num_workers=2, progress=False)
    run = work / "run"
    rc = viq(["train", str(RECIPE), f"data.train={data['train']}", "data.demo=false", f"model.tokenizer={tok_dir}",
              f"data.codes={codes}", f"train.output_dir={run}", f"train.max_steps={steps}"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] if rc == 0 else []
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    first = [losses[s] for s in sorted(losses)[:3]]
    last = [losses[s] for s in sorted(losses)[-3:]]
    falls = bool(first) and sum(last) / len(last) < sum(first) / len(first)
    ok = rc == 0 and sorted(losses) == list(range(1, steps + 1)) and falls
    speed = [r for r in log if "tokens_per_s" in r]
    report = {"device": device, "steps": len(losses), "losses": losses, "loss_falls": falls,
              "encoded_images": manifest and manifest["counts"]["encoded"],
              "tokens_per_s": speed[-1]["tokens_per_s"] if speed else None,
              "peak_mem_gib": speed[-1].get("peak_mem_gib") if speed else None,
              "deepspeed_imported": "deepspeed" in sys.modules, "wall_s": time.perf_counter() - t0, "passed": ok}
    trend = f"loss {first[0]:.3f} -> {last[-1]:.3f} ({'falls' if falls else 'DOES NOT FALL'})" if losses else "no loss"
    print(f"LoRA from codes on {device}: {len(losses)} steps, {trend}, {report['tokens_per_s']} tokens/s, "
          f"DeepSpeed imported: {report['deepspeed_imported']}; {'ok' if ok else 'FAIL'}")
    _write(out, "train", report)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("out", type=Path)
    p.add_argument("--require-cuda", action="store_true")
    p = sub.add_parser("attention")
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the packed LLM row")
    p = sub.add_parser("train")
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=64, help="demo training samples")
    args = parser.parse_args(argv)
    if args.step == "preflight":
        return preflight(args.out, args.require_cuda)
    if args.step == "attention":
        return attention(args.out, args.device, args.tokens)
    import logging

    from mllm.cli import setup_logging

    setup_logging(logging.INFO)
    return train(args.out, args.device, args.work, args.steps, args.samples)


if __name__ == "__main__":
    sys.exit(main())
