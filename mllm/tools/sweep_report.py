"""The report of a sweep: ``report.md`` (one row per variant, mean +- std over seeds, the best per column
marked, the paper's numbers beside ours), ``results.json`` and ``sweep.png`` (the metrics with error bars).

The spread is the sample standard deviation over seeds. The best mean of a column is called a win only when it
beats the runner-up by more than the two variants' spreads added (their mean +- std intervals do not
overlap); otherwise the report says the difference is within the seeds' spread. With one seed there is no
spread, and no win.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mllm.tools.sweep_config import Plan
from viq.configio import to_dict

# +1: higher is better, -1: lower is better, 0: a reference (no best)
DIRECTIONS = {"psnr": 1, "ssim": 1, "psnr_mean_colour": 0, "codebook_usage": 1, "perplexity": 1,
              "code_stability": 1, "vqa_accuracy": 1}
PAPER_COMPARED = ("vqa_accuracy", "probe_mean")  # ours that stands for the paper's understanding score
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def direction(metric: str) -> int:
    if metric.startswith("probe_"):
        return 1
    if metric.startswith("seconds_"):
        return -1
    return DIRECTIONS.get(metric, 0)


def aggregate(cells: list[dict], variants: list[str]) -> dict[str, dict[str, dict]]:
    """variant -> metric -> {mean, std (None below two seeds), n, values (in seed order)}."""
    out: dict[str, dict[str, dict]] = {}
    for variant in variants:
        rows = sorted((c for c in cells if c["variant"] == variant), key=lambda c: c["seed"])
        metrics: dict[str, list[float]] = {}
        for row in rows:
            for name, value in row["metrics"].items():
                if value is not None and math.isfinite(value):
                    metrics.setdefault(name, []).append(float(value))
        out[variant] = {name: {"mean": statistics.fmean(vals),
                               "std": statistics.stdev(vals) if len(vals) > 1 else None,
                               "n": len(vals), "values": vals}
                        for name, vals in metrics.items()}
    return out


def verdict(agg: dict[str, dict[str, dict]], metric: str) -> dict | None:
    """The best variant of a column and whether it is a win over the runner-up (see the module doc)."""
    sign = direction(metric)
    scored = [(v, m[metric]) for v, m in agg.items() if metric in m]
    if sign == 0 or not scored:
        return None
    scored.sort(key=lambda vm: -sign * vm[1]["mean"])
    best, stats = scored[0]
    out = {"best": best, "mean": stats["mean"], "std": stats["std"]}
    if len(scored) == 1:
        return {**out, "status": "only variant"}
    second, other = scored[1]
    gap = abs(stats["mean"] - other["mean"])
    out.update(runner_up=second, gap=gap)
    if stats["std"] is None or other["std"] is None:
        return {**out, "status": "one seed: no spread"}
    spread = stats["std"] + other["std"]
    return {**out, "spread": spread, "status": "win" if gap > spread else "within spread"}


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    spec = ".1f" if metric.startswith("seconds_") else ".2f" if metric.startswith("psnr") else ".3f"
    return format(value, spec)


def _cell(metric: str, stats: dict | None, mark: str) -> str:
    if stats is None:
        return "–"
    text = _fmt(metric, stats["mean"]) + ("" if stats["std"] is None else f" ± {_fmt(metric, stats['std'])}")
    return {"win": f"**{text}**", "within spread": f"{text} ≈"}.get(mark, text)


def columns(agg: dict[str, dict[str, dict]]) -> list[str]:
    """The main table's metrics (the wall time of each stage has a table of its own)."""
    names = {m for metrics in agg.values() for m in metrics if not _stage_time(m)}
    order = ["vqa_accuracy", "probe_mean", "probe_colour", "probe_shape", "probe_count", "probe_position",
             "probe_word", "psnr", "psnr_mean_colour", "ssim", "codebook_usage", "perplexity", "code_stability",
             "seconds_total"]
    return [m for m in order if m in names] + sorted(m for m in names if m not in order)


def _stage_time(metric: str) -> bool:
    return metric.startswith("seconds_") and metric != "seconds_total"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def time_table(plan: Plan, agg: dict) -> list[str]:
    stages = [f"seconds_{s.name}" for s in plan.stages]
    if not any(m in agg.get(v.name, {}) for v in plan.variants for m in stages):
        return []
    rows = [[v.name, *(_cell(m, agg.get(v.name, {}).get(m), "") for m in stages)] for v in plan.variants]
    return ["", "## Wall time per stage (s)", "", *_table(["variant", *(s.name for s in plan.stages)], rows)]


def chance_levels(cells: list[dict]) -> dict[str, float]:
    """The probe's chance level per question type (the most frequent training answer), over the cells."""
    chance: dict[str, list[float]] = {}
    for cell in cells:
        for qtype, result in (cell.get("probe") or {}).items():
            chance.setdefault(qtype, []).append(result["chance"])
    return {t: statistics.fmean(v) for t, v in sorted(chance.items())}


def chance_line(cells: list[dict]) -> list[str]:
    chance = chance_levels(cells)
    if not chance:
        return []
    return ["", "Probe chance level (always the most frequent training answer, on the test images): "
            + ", ".join(f"{t} {v:.3f}" for t, v in chance.items()) + "."]


def paper_summary(plan: Plan, agg: dict[str, dict[str, dict]], verdicts: dict) -> list[str]:
    paper = {v.name: v.paper for v in plan.variants if v.paper is not None}
    if not paper:
        return []
    ranked = sorted(paper, key=lambda n: -paper[n])
    lines = [f"The paper ({plan.sweep.paper_metric or 'its ablation score'}): "
             + " > ".join(f"{n} {paper[n]:g}" for n in ranked) + "."]
    ours = next((m for m in PAPER_COMPARED if verdicts.get(m)), None)
    if ours is None:
        return lines
    v = verdicts[ours]
    order = sorted((n for n in agg if ours in agg[n]), key=lambda n: -agg[n][ours]["mean"])
    lines.append(f"Ours by {ours}: " + " > ".join(f"{n} {_fmt(ours, agg[n][ours]['mean'])}" for n in order) + ".")
    if v["status"] == "win":
        agree = "agrees with" if v["best"] == ranked[0] else "differs from"
        lines.append(f"Our best, {v['best']}, is a win beyond the seeds' spread and {agree} the paper's best "
                     f"({ranked[0]}).")
    else:
        lines.append(f"Our best mean, {v['best']}, is {v['status']} of the runner-up: this sweep does not "
                     f"separate the variants, so it neither confirms nor contradicts the paper's best ({ranked[0]}).")
    return lines


def render(plan: Plan, cells: list[dict], agg: dict, verdicts: dict, missing: list[str]) -> str:
    sweep = plan.sweep
    cols = columns(agg)
    has_paper = any(v.paper is not None for v in plan.variants)
    head = ["variant", *(["paper"] if has_paper else []), *cols]
    arrows = {1: "↑", -1: "↓", 0: "ref."}
    lines = [f"# Sweep {sweep.name}", "",
             f"{len(plan.variants)} variants x {len(sweep.seeds)} seeds (seeds {list(sweep.seeds)}); "
             f"{len(cells)} of {len(plan.cells)} cells finished. Each entry: mean ± std over seeds (sample std).",
             "**Bold**: the best of its column, ahead of the runner-up by more than their two spreads added. "
             "≈: the best mean, but within the seeds' spread of the runner-up: not a win.", ""]
    rows = [["better", *(["higher"] if has_paper else []), *(arrows[direction(c)] for c in cols)]]
    for variant in plan.variants:
        row = [variant.name]
        if has_paper:
            row.append("–" if variant.paper is None else f"{variant.paper:g}")
        for c in cols:
            v = verdicts.get(c)
            mark = v["status"] if v and v["best"] == variant.name else ""
            row.append(_cell(c, agg.get(variant.name, {}).get(c), mark))
        rows.append(row)
    lines += [*_table(head, rows), *chance_line(cells), *time_table(plan, agg), "", "## Verdicts", ""]
    for c in cols:
        v = verdicts.get(c)
        if v is None:
            continue
        text = f"- {c}: best {v['best']} ({_fmt(c, v['mean'])})"
        if "runner_up" in v:
            text += f", runner-up {v['runner_up']}, gap {_fmt(c, v['gap'])}"
        if "spread" in v:
            text += f", spread {_fmt(c, v['spread'])}"
        lines.append(text + f": {v['status']}.")
    summary = paper_summary(plan, agg, verdicts)
    if summary:
        lines += ["", "## Against the paper", "", *summary]
    if missing:
        lines += ["", f"Not finished (left out): {', '.join(missing)}."]
    lines += ["", "![metrics per variant](sweep.png)", ""]
    return "\n".join(lines)


def plot(agg: dict, cols: list[str], variants: list[str], chance: dict[str, float], path: Path) -> None:
    shown = cols
    ncols = min(4, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(shown):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        stats = [agg[v].get(metric) for v in variants]
        means = [s["mean"] if s else math.nan for s in stats]
        errs = [s["std"] or 0.0 if s else 0.0 for s in stats]
        ax.bar(range(len(variants)), means, yerr=errs, capsize=3,
               color=[COLOURS[k % len(COLOURS)] for k in range(len(variants))])
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        arrow = {1: " (↑)", -1: " (↓)"}.get(direction(metric), "")
        ax.set_title(metric + arrow, fontsize=9)
        level = chance.get(metric.removeprefix("probe_"))
        if level is not None:
            ax.axhline(level, color="#555555", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("mean ± std over seeds", fontsize=9)
    fig.savefig(path, dpi=120)


def collect(plan: Plan, cell_file: str) -> dict:
    """Read every finished cell of ``plan`` and write the report; cells not finished are listed, not fatal."""
    sweep = plan.sweep
    cells, missing = [], []
    for cell in plan.cells:
        path = cell.folder(sweep.work) / cell_file
        if path.is_file():
            cells.append(json.loads(path.read_text()))
        else:
            missing.append(cell.key)
    if not cells:
        raise ValueError(f"no cell of sweep {sweep.name} has finished yet (looked under {sweep.work / 'cells'})")
    names = [v.name for v in plan.variants]
    agg = aggregate(cells, names)
    cols = columns(agg)
    verdicts = {c: v for c in cols if (v := verdict(agg, c)) is not None}
    report = sweep.report
    report.mkdir(parents=True, exist_ok=True)
    results = {"sweep": to_dict(sweep), "report_dir": str(report), "cells": cells, "missing": missing,
               "aggregate": agg, "verdicts": verdicts,
               "paper": {v.name: v.paper for v in plan.variants if v.paper is not None}}
    (report / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (report / "report.md").write_text(render(plan, cells, agg, verdicts, missing))
    plot(agg, cols, names, chance_levels(cells), report / "sweep.png")
    return results
