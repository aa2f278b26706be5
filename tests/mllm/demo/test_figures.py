"""The demo's figures: one panel per part with the right scale, every curve in a style of its own, titles
that name the machine."""

from __future__ import annotations

import json
import math

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
