"""The bench's figure: no text drawn over other text for few or many cells, a title naming the machine,
every mode in a style of its own."""

from __future__ import annotations

from itertools import combinations

import pytest
from matplotlib.text import Text

from mllm.tools.bench_plot import bench_figure

MACHINE = "Test CPU 9000 (x86_64, 2 cores)"
MODES = ["continuous", "continuous-trainable", "viq-online", "viq-offline", "viq-offline-unfolded", "text-only"]


def _bench_result(n_cells: int, device: str = MACHINE) -> dict:
    llms = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b-instruct-long"]
    records, summary = [], []
    for k in range(n_cells):
        llm, seq = llms[k // 2 % len(llms)], (4096, 16384)[k % 2]
        base = (1 + k) * (1 if seq == 4096 else 3)
        times = dict(zip(MODES, (2.0 * base, 5.0 * base, 2.6 * base, 1.0 * base, 1.1 * base, 0.9 * base), strict=True))
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
