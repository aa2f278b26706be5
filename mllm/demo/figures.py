"""The demo's figures: training losses per part and tokenizer reconstructions.

The ``*_figure`` functions take the data they draw and return a matplotlib ``Figure`` (tests inspect it);
the ``plot_*`` functions save one and return its path. Figures are built without pyplot, so drawing
never touches a global backend or leaks figures in a long process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image

from mllm.train.rundir import LOG_FILE
from viq import ViQTokenizer
from viq.tokenizer import to_pil

# Okabe-Ito colours (distinguishable with colour-blindness), each with its own dash and marker, so that
# curves stay apart in greyscale prints too
STYLES: tuple[tuple[str, str, str], ...] = (
    ("#0072B2", "-", "o"),
    ("#D55E00", "--", "s"),
    ("#009E73", "-.", "^"),
    ("#CC79A7", ":", "D"),
    ("#E69F00", (0, (5, 1, 1, 1)), "v"),
    ("#56B4E9", (0, (3, 1, 1, 1, 1, 1)), "P"),
    ("#000000", (0, (1, 1)), "X"),
)
MARKERS_PER_CURVE = 8
LOG_SCALE_RATIO = 10.0  # a panel whose losses span more than this factor gets a log y axis
DPI = 120

# readable titles for the debug chain's run directories (recipe file names); others keep their name
STAGE_TITLES = {
    "stage1": "stage 1: encoder, text-aligned",
    "stage2_1_proximal": "stage 2-1: proximal head",
    "stage2_2_fsq": "stage 2-2: FSQ codes",
    "decoder": "pixel decoder",
}


@dataclass(frozen=True)
class LossLog:
    """One run's training loss as logged: (step, loss) per logging step, and the trainer's mean over the
    whole run (``train_loss``), which is all a run shorter than its logging interval leaves."""

    steps: tuple[int, ...] = ()
    losses: tuple[float, ...] = ()
    run_mean: float | None = None
    run_steps: int | None = None


def read_loss_log(run_dir: Path) -> LossLog:
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return LossLog()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    logged = [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r and "step" in r]
    summary = next((r for r in reversed(rows) if "train_loss" in r), None)
    return LossLog(
        steps=tuple(s for s, _ in logged),
        losses=tuple(v for _, v in logged),
        run_mean=None if summary is None else float(summary["train_loss"]),
        run_steps=None if summary is None else summary.get("step"),
    )


def _new_figure(**kw) -> Figure:
    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)  # a canvas of its own: tests can draw it and measure text extents
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path


def wants_log_scale(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > LOG_SCALE_RATIO


def _log_y(ax: Axes) -> None:
    ax.set_yscale("log")
    # 1-2-5 ticks in plain numbers: a span of one decade would otherwise get a single labelled tick
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _draw_panel(ax: Axes, title: str, logs: Mapping[str, LossLog], styles: Sequence[tuple]) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = []
    for (name, log), (colour, dash, marker) in zip(logs.items(), styles, strict=True):
        if not log.steps:
            continue
        every = max(1, math.ceil(len(log.steps) / MARKERS_PER_CURVE))
        ax.plot(log.steps, log.losses, color=colour, linestyle=dash, marker=marker, markevery=every,
                markersize=4, linewidth=1.3, label=name)
        values += log.losses
    if values:
        ax.set_xlim(left=0)  # every run starts at step 1: a short run reads as short
        if wants_log_scale(values):
            _log_y(ax)
    missing = [(name, log) for name, log in logs.items() if not log.steps]
    if missing:
        notes = []
        for name, log in missing:
            who = f"{name}: " if len(logs) > 1 else ""
            if log.run_mean is not None:
                span = f"steps 1-{log.run_steps}" if log.run_steps else "the run"
                notes.append(f"{who}no step logged\n(mean loss over {span}: {log.run_mean:.3g})")
            else:
                notes.append(f"{who}no loss logged")
        ax.text(0.5, 0.5, "\n".join(notes), transform=ax.transAxes, ha="center", va="center", fontsize=8,
                color="0.35")
        if not values:
            ax.set_xticks([])
            ax.set_yticks([])


def loss_figure(tokenizer: Mapping[str, LossLog], mllm: Mapping[str, LossLog], machine: str) -> Figure:
    """One panel per tokenizer stage (in the order given; each stage has its own objective and scale),
    then one wide panel comparing the MLLMs. Every panel is against its run's training step, with a log
    y axis where its losses span more than ``LOG_SCALE_RATIO``; every curve has its own colour, dash
    and marker."""
    stages = list(tokenizer)
    cols = max(1, len(stages))
    fig = _new_figure(figsize=(max(8.0, 2.6 * cols), 6.4 if stages else 3.8))
    layout = ([stages] if stages else []) + [["mllm"] * cols]
    axes = fig.subplot_mosaic(layout, height_ratios=[1, 1.15] if stages else None)
    for i, name in enumerate(stages):
        _draw_panel(axes[name], STAGE_TITLES.get(name, name), {name: tokenizer[name]}, [STYLES[2 + i % 5]])
    if stages:
        axes[stages[0]].set_ylabel("training loss", fontsize=8)
    ax = axes["mllm"]
    _draw_panel(ax, "MLLM: " + " vs ".join(mllm), mllm, [STYLES[i % len(STYLES)] for i in range(len(mllm))])
    ax.set_ylabel("training loss (next token)", fontsize=8)
    if ax.lines:
        handles = ax.lines
        labels = [f"{h.get_label()} (last {log.losses[-1]:.3g})"
                  for h, log in zip(handles, (lg for lg in mllm.values() if lg.steps), strict=True)]
        ax.legend(handles, labels, fontsize=8, loc="upper right", frameon=True, framealpha=0.9)
    fig.suptitle(f"Demo training losses: tokenizer chain (top), MLLMs (bottom)\non {machine}", fontsize=10)
    return fig


def plot_losses(tokenizer: Mapping[str, LossLog], mllm: Mapping[str, LossLog], machine: str, path: Path) -> Path:
    return _save(loss_figure(tokenizer, mllm, machine), path)


def reconstruction_pairs(tok: ViQTokenizer, images: list) -> tuple[list[Image.Image], list[Image.Image]]:
    """The images as the tokenizer sees them (resized to its grid) and as decoded from their codes."""
    pixels = tok.preprocess(images)
    return [to_pil(x) for x in pixels], tok.decode(tok.encode(pixels))


def _psnr_u8(a: Image.Image, b: Image.Image) -> float | None:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return None
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reconstruction_figure(originals: Sequence[Image.Image], decoded: Sequence[Image.Image], machine: str) -> Figure:
    """Originals above their reconstructions from codes, each reconstruction with its PSNR."""
    n = len(originals)
    fig = _new_figure(figsize=(max(5.0, 2.2 * n), 5.0))
    axes = fig.subplots(2, n, squeeze=False)
    for i, (o, r) in enumerate(zip(originals, decoded, strict=True)):
        psnr = _psnr_u8(o, r)
        for row, img, label in ((0, o, f"{o.width}x{o.height}"),
                                (1, r, "" if psnr is None else f"PSNR {psnr:.1f} dB")):
            ax = axes[row][i]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label, fontsize=8)
    axes[0][0].set_ylabel("input", fontsize=9)
    axes[1][0].set_ylabel("decoded from codes", fontsize=9)
    fig.suptitle(f"ViQ tokenizer: test images and their reconstructions from codes\non {machine}", fontsize=10)
    return fig


def plot_reconstructions(originals: Sequence[Image.Image], decoded: Sequence[Image.Image], machine: str,
                         path: Path) -> Path:
    return _save(reconstruction_figure(originals, decoded, machine), path)
