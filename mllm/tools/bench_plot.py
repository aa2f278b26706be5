"""``bench.png``: the median training-step time of each visual input mode per (LLM, sequence length) cell,
with the time viq-offline saves against the continuous tower written above each cell."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Okabe-Ito colours with hatches, so that modes stay apart for colour-blind readers and in greyscale
MODE_STYLES = {
    "continuous": ("#D55E00", ""),
    "continuous-trainable": ("#E69F00", "//"),
    "viq-online": ("#56B4E9", ".."),
    "viq-offline": ("#0072B2", ""),
    "viq-offline-unfolded": ("#009E73", "\\\\"),
    "text-only": ("#999999", "xx"),
}
OTHER_STYLES = (("#CC79A7", "++"), ("#000000", "--"))
CELL_INCHES = 1.4  # room per cell for its two-line tick label and saving label at 8 pt
CHAR_INCHES = 0.075  # a little over the mean width of a DejaVu Sans character at 8 pt, for longer names
HEADROOM = 1.35  # y range over the tallest bar: the saving labels sit above the bars, inside the axes


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.0f} %".replace("-", "\u2212")


def _step_time(result: dict, cell: tuple[str, int], mode: str) -> float:
    for r in result["records"]:
        if (r["llm"], r["seq_len"], r["mode"], r["packed"]) == (*cell, mode, True):
            return math.nan if r["step_time_s"] is None else r["step_time_s"]
    return math.nan


def _machine_lines(result: dict, width: int) -> str:
    """"on <device>, <threads>, <dtype>", broken between its parts (never inside one) to fit ``width``."""
    threads = result.get("threads")
    parts = [f"on {result.get('device', 'an unknown device')}"]
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if result.get("config", {}).get("dtype"):
        parts.append(result["config"]["dtype"])
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) > width:
            lines[-1] += ","
            lines.append(part)
        else:
            lines[-1] += ", " + part
    return "\n".join(lines)


def bench_figure(result: dict) -> Figure:
    """The figure of one bench result (the bench.json content)."""
    cells = [(s["llm"], s["seq_len"]) for s in result["summary"]]
    modes = list(result["config"]["modes"])
    ticks = [f"{llm}\n{seq} tokens" for llm, seq in cells]
    longest = max((len(line) for t in ticks for line in t.split("\n")), default=0)
    cell_in = max(CELL_INCHES, CHAR_INCHES * longest + 0.2)
    width_in = max(6.4, 2.6 + cell_in * max(1, len(cells)))  # 2.6: y label and the legend on the right
    fig = Figure(figsize=(width_in, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bar = 0.8 / max(1, len(modes))
    tallest = 0.0
    group_top = [0.0] * len(cells)
    extra = iter(OTHER_STYLES * len(modes))
    for j, mode in enumerate(modes):
        colour, hatch = MODE_STYLES.get(mode) or next(extra)
        times = [_step_time(result, c, mode) for c in cells]
        xs = [i + (j - (len(modes) - 1) / 2) * bar for i in range(len(cells))]
        ax.bar(xs, times, bar, label=mode, color=colour, hatch=hatch, edgecolor="white", linewidth=0.5)
        for i, t in enumerate(times):
            if math.isfinite(t):
                group_top[i] = max(group_top[i], t)
                tallest = max(tallest, t)
    for i, s in enumerate(result["summary"]):
        if s.get("saving_vs_continuous") is None:
            continue
        text = f"offline {_signed_pct(-s['saving_vs_continuous'])}"
        if s.get("paper_saving") is not None:
            text += f"\npaper {_signed_pct(-s['paper_saving'])}"
        ax.annotate(text, (i, group_top[i]), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, fontweight="bold", color=MODE_STYLES["viq-offline"][0])
    ax.set_ylim(0, (tallest or 1.0) * HEADROOM)
    ax.set_xlim(-0.6, len(cells) - 0.4)
    ax.set_xticks(range(len(cells)), ticks, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_ylabel("seconds per training step (median)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title("above each cell: viq-offline step time against continuous (and the paper's ratio)",
                 fontsize=8, color="0.3")
    # beside the axes, not inside (it would cover tall bars) nor in the figure's corner (the title's row)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8, title="visual input",
              title_fontsize=8)
    machine = _machine_lines(result, width=int(width_in * 10))  # about 10 characters an inch at 10 pt
    fig.suptitle(f"Training step time by visual input mode (packed batches)\n{machine}", fontsize=10)
    return fig


def plot(result: dict, path: Path) -> Path:
    path = Path(path)
    bench_figure(result).savefig(path, dpi=120)
    return path
