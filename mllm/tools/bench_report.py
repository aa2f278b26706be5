"""The report files of ``viq bench``: ``bench.md`` (the step table, the per-cell summary and the data path's
throughput), ``bench.json`` and ``bench.png`` (mllm.tools.bench_plot), each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mllm.tools import bench_plot


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, fmt: str, unit: str = "") -> str:
    return "-" if x is None else format(x, fmt) + unit


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# ViQ training-step benchmark",
        "",
        f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}, {cfg['dtype']}, "
        f"LLM attention {cfg['llm_attn']}, encoder {cfg['encoder']}; median of {cfg['steps']} steps after "
        f"{cfg['warmup']} warm-up, modes interleaved. A step is forward + backward + AdamW.",
        "",
        "| LLM | seq | mode | batch | s/step | tokens/s | peak mem GiB | MFU | images | patches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        lines.append(
            f"| {r['llm']} | {r['seq_len']} | {r['mode']} | {'packed' if r['packed'] else 'padded'} | "
            f"{_num(r['step_time_s'], '.4f')} | {_num(r['tokens_per_s'], '.0f')} | {_num(mem, '.2f')} | "
            f"{_pct(r['mfu'])} | "
            f"{r['images']} | {r['patches']} |"
        )
    modes = cfg["padded_modes"]
    head = ["LLM", "seq", "saving vs continuous", "paper", "vs continuous-trainable", "offline over text-only",
            "predicted", "unfolded over text-only", "embedder share of step FLOPs", "loader share of step",
            *(f"packed/padded {m}" for m in modes)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result["summary"]:
        cells = [s["llm"], str(s["seq_len"]), _pct(s["saving_vs_continuous"]), _pct(s["paper_saving"]),
                 _pct(s["saving_vs_continuous_trainable"]), _pct(s["overhead_vs_text_only"]),
                 _pct(s.get("overhead_vs_text_only_predicted")), _pct(s.get("overhead_vs_text_only_unfolded")),
                 _pct(s["embedder_step_flop_share"]), _pct(s.get("loader_share_of_step")),
                 *(_num(s["packed_speedup"].get(m), ".2f", "x") for m in modes)]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("loader"):
        lines += ["", markdown_loader(result["loader"])]
    return "\n".join(lines) + "\n"


def markdown_loader(loaders: list[dict]) -> str:
    lines = [
        "Code-shard data path (CodeStore -> CodesDataset -> PackedDataset -> collate_packed), on this machine's CPU:",
        "",
        "| seq | samples | rows | prepare s | samples/s in-process | s/row | samples/s with workers | s/row |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in loaders:
        one, many = d["single"], d.get("workers") or {}
        lines.append(
            f"| {d['seq_len']} | {d['samples']} | {d['rows']} | {d['prepare_s']:.2f} | "
            f"{_num(one['samples_per_s'], '.0f')} | {_num(one['row_s'], '.4f')} | "
            f"{_num(many.get('samples_per_s'), '.0f')} ({d['workers_count']}) | {_num(many.get('row_s'), '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def _atomic(path: Path, write) -> None:
    # a reader (or a run killed mid-write) never sees half a report
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(out_dir / "bench.json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    _atomic(out_dir / "bench.md", lambda p: p.write_text(markdown(result)))
    _atomic(out_dir / "bench.png", lambda p: bench_plot.plot(result, p))
