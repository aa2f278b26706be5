"""The demo's and the bench's figures: one panel per part with the right scale, every curve in a style of
its own, titles that name the machine, and no text drawn over other text for few or many bench cells."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
from matplotlib.text import Text
from PIL import Image

from mllm.demo.figures import (
    MARKERS_PER_CURVE,
    STAGE_TITLES,
    LossLog,
    loss_figure,
    plot_losses,
    read_loss_log,
    reconstruction_figure,
)
from mllm.tools.bench_plot import bench_figure

MACHINE = "Test CPU 9000 (x86_64, 2 cores)"
STAGES = ("stage1", "stage2_1_proximal", "stage2_2_fsq", "decoder")
MLLM_PANEL = "MLLM: from ViQ codes vs continuous tower"
MODES = ["continuous", "continuous-trainable", "viq-online", "viq-offline", "text-only"]


def _log(n_steps: int, every: int, start: float, end: float) -> LossLog:
    steps = tuple(range(every, n_steps + 1, every))
    losses = tuple(end + (start - end) * math.exp(-5 * s / n_steps) for s in steps)
    return LossLog(steps, losses, sum(losses) / len(losses), n_steps)


def _full_demo_logs() -> tuple[dict, dict]:
    """The full demo's lengths and loss ranges: the decoder's MSE is a hundred times below the others."""
    tokenizer = {"stage1": _log(30, 5, 7.9, 7.2), "stage2_1_proximal": _log(300, 5, 42, 8.5),
                 "stage2_2_fsq": _log(300, 5, 52, 8.0), "decoder": _log(600, 10, 0.45, 0.02)}
    mllm = {"from ViQ codes": _log(900, 10, 7.6, 0.32), "continuous tower": _log(900, 10, 7.6, 0.30)}
    return tokenizer, mllm


def _panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def test_loss_figure_has_one_panel_per_part_in_chain_order():
    tokenizer, mllm = _full_demo_logs()
    fig = loss_figure(tokenizer, mllm, MACHINE)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [*(STAGE_TITLES[s] for s in STAGES), MLLM_PANEL]
    assert MACHINE in fig.get_suptitle() and "loss" in fig.get_suptitle()
    assert all(ax.get_xlabel() == "training step" for ax in fig.axes)
    # against the step each run logged, not the index of the logged row
    dec = _panels(fig)[STAGE_TITLES["decoder"]].lines[0]
    assert list(dec.get_xdata()) == list(range(10, 601, 10))


def test_loss_panels_are_log_scaled_where_the_range_exceeds_ten():
    tokenizer, mllm = _full_demo_logs()
    scales = {t: ax.get_yscale() for t, ax in _panels(loss_figure(tokenizer, mllm, MACHINE)).items()}
    assert scales == {STAGE_TITLES["stage1"]: "linear",  # 7.9 -> 7.2
                      STAGE_TITLES["stage2_1_proximal"]: "linear",  # 42 -> 8.5: under 10x
                      STAGE_TITLES["stage2_2_fsq"]: "linear",
                      STAGE_TITLES["decoder"]: "log",  # 0.45 -> 0.02
                      MLLM_PANEL: "log"}  # 7.6 -> 0.3


def test_every_curve_is_drawn_in_a_style_of_its_own_with_sparse_markers():
    tokenizer, mllm = _full_demo_logs()
    fig = loss_figure(tokenizer, mllm, MACHINE)
    lines = [line for ax in fig.axes for line in ax.lines]
    assert sorted(line.get_label() for line in lines) == sorted([*STAGES, *mllm])
    styles = [(line.get_color(), str(line.get_linestyle()), line.get_marker()) for line in lines]
    assert len(set(styles)) == len(styles)
    # and the two MLLMs differ in every component, so they stay apart even where they overlap
    a, b = _panels(fig)[MLLM_PANEL].lines
    assert a.get_color() != b.get_color() and a.get_linestyle() != b.get_linestyle()
    assert a.get_marker() != b.get_marker()
    for line in lines:
        shown = range(len(line.get_xdata()))[slice(None, None, line.get_markevery())]
        assert 1 <= len(shown) <= MARKERS_PER_CURVE + 1, line.get_label()
    legend = [t.get_text() for t in _panels(fig)[MLLM_PANEL].get_legend().get_texts()]
    assert legend == [f"{name} (last {log.losses[-1]:.3g})" for name, log in mllm.items()]


def test_a_run_shorter_than_its_logging_interval_says_so(tmp_path):
    run = tmp_path / "stage1"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 3, "train_loss": 8.345, "epoch": 0.15}) + "\n")
    log = read_loss_log(run)
    assert log == LossLog((), (), 8.345, 3)
    assert read_loss_log(tmp_path / "absent") == LossLog()
    _, mllm = _full_demo_logs()
    fig = loss_figure({"stage1": log, "decoder": _log(6, 2, 0.5, 0.4)}, mllm, MACHINE)
    empty = _panels(fig)[STAGE_TITLES["stage1"]]
    assert not empty.lines and "mean loss over steps 1-3: 8.35" in empty.texts[0].get_text()
    out = plot_losses({"stage1": log}, mllm, MACHINE, tmp_path / "loss.png")
    assert out.stat().st_size > 0


def test_loss_log_reads_steps_and_skips_summary_rows(tmp_path):
    rows = [{"step": 10, "loss": 2.0, "grad_norm": 1.0}, {"step": 20, "loss": 1.5},
            {"step": 20, "train_loss": 1.75, "train_runtime": 3.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_loss_log(tmp_path) == LossLog((10, 20), (2.0, 1.5), 1.75, 20)


def test_reconstruction_figure_names_the_machine_and_each_psnr():
    originals = [Image.new("RGB", (64, 32), (200, 30, 30)), Image.new("RGB", (32, 48), (20, 160, 60))]
    decoded = [Image.new("RGB", (64, 32), (190, 40, 30)), Image.new("RGB", (32, 48), (20, 160, 60))]
    fig = reconstruction_figure(originals, decoded, MACHINE)
    assert MACHINE in fig.get_suptitle() and "reconstruction" in fig.get_suptitle()
    assert len(fig.axes) == 4
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert labels[:2] == ["64x32", "32x48"]
    assert labels[2] == "PSNR 29.9 dB" and labels[3] == "PSNR inf dB"  # mse (100 + 100 + 0) / 3


# ------------------------------------------------------------------------------------------ bench


def _bench_result(n_cells: int, device: str = MACHINE) -> dict:
    llms = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b-instruct-long"]
    records, summary = [], []
    for k in range(n_cells):
        llm, seq = llms[k // 2 % len(llms)], (4096, 16384)[k % 2]
        base = (1 + k) * (1 if seq == 4096 else 3)
        times = dict(zip(MODES, (2.0 * base, 5.0 * base, 2.6 * base, 1.0 * base, 0.9 * base), strict=True))
        times["viq-online"] = None if k == 1 else times["viq-online"]  # a mode that failed leaves a gap
        records += [{"llm": llm, "seq_len": seq, "mode": m, "packed": True, "step_time_s": t}
                    for m, t in times.items()]
        summary.append({"llm": llm, "seq_len": seq, "saving_vs_continuous": 0.5 - 0.01 * k,
                        "paper_saving": 0.45 if k % 3 else None})
    return {"device": device, "threads": 1, "torch": "2.x", "config": {"modes": MODES, "dtype": "float32"},
            "records": records, "summary": summary}


def _drawn_texts(fig) -> list[Text]:
    """The non-empty texts the renderer draws (tick labels outside the view are skipped)."""
    fig.canvas.draw()
    hidden = set()
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not min(lo, hi) <= tick.get_loc() <= max(lo, hi):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [t for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


@pytest.mark.parametrize("n_cells", [1, 2, 4, 8, 12])
def test_bench_figure_draws_no_text_over_text(n_cells):
    fig = bench_figure(_bench_result(n_cells))
    texts = _drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer).shrunk(0.98, 0.98)) for t in texts]
    overlaps = [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]
    assert not overlaps
    page = fig.bbox
    assert all(page.x0 <= bb.x0 and bb.x1 <= page.x1 and page.y0 <= bb.y0 and bb.y1 <= page.y1
               for _, bb in boxes), "a text runs off the figure"
    # every cell's saving label is there and stays inside the axes (never up in the titles)
    ax = fig.axes[0]
    savings = [t for t in ax.texts if t.get_text().startswith("offline")]
    assert len(savings) == n_cells
    assert all(ax.get_window_extent().contains(*t.get_window_extent(renderer).corners()[1]) for t in savings)
    assert "offline \u221250 %" == savings[0].get_text()
    if n_cells > 1:
        assert savings[1].get_text() == "offline \u221249 %\npaper \u221245 %"


def test_bench_figure_names_the_machine_and_draws_every_mode():
    long_name = "Intel(R) Xeon(R) Platinum 8480+ with a very long model string (x86_64, 224 cores)"
    fig = bench_figure(_bench_result(1, device=long_name))
    assert long_name in fig.get_suptitle() and "1 thread" in fig.get_suptitle()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == MODES
    assert [c.get_label() for c in ax.containers] == MODES
    styles = [(c.patches[0].get_facecolor(), c.patches[0].get_hatch()) for c in ax.containers]
    assert len(set(styles)) == len(MODES)
