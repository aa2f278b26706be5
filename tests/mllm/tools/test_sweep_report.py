"""The sweep report on made-up cells: aggregation, wins only beyond the seeds' spread, the table, and the
SLURM scripts of ``--launcher slurm``."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest
import yaml

from mllm.tools.sweep_config import build_plan, load_sweep
from mllm.tools.sweep_launch import write_slurm
from mllm.tools.sweep_report import aggregate, collect, verdict


def _cells(values: dict[str, list[float]], metric: str = "probe_mean") -> list[dict]:
    return [{"variant": v, "seed": s, "metrics": {metric: x, "seconds_total": 10.0 + s}}
            for v, xs in values.items() for s, x in enumerate(xs)]


def test_aggregate_is_the_mean_and_sample_std_over_seeds():
    agg = aggregate(_cells({"a": [0.5, 0.7, 0.9], "b": [0.1]}), ["a", "b"])
    assert agg["a"]["probe_mean"]["mean"] == pytest.approx(0.7)
    assert agg["a"]["probe_mean"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert agg["a"]["probe_mean"]["std"] == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert agg["a"]["probe_mean"]["values"] == [0.5, 0.7, 0.9] and agg["a"]["probe_mean"]["n"] == 3
    assert agg["b"]["probe_mean"] == {"mean": 0.1, "std": None, "n": 1, "values": [0.1]}


def test_a_win_needs_a_gap_beyond_the_seeds_spread():
    clear = aggregate(_cells({"a": [0.80, 0.82, 0.84], "b": [0.50, 0.52, 0.54]}), ["a", "b"])
    assert verdict(clear, "probe_mean") | {"gap": None, "spread": None} == {
        "best": "a", "mean": pytest.approx(0.82), "std": pytest.approx(0.02), "runner_up": "b",
        "gap": None, "spread": None, "status": "win"}
    noisy = aggregate(_cells({"a": [0.60, 0.80, 1.00], "b": [0.55, 0.75, 0.95]}), ["a", "b"])
    v = verdict(noisy, "probe_mean")
    assert v["best"] == "a" and v["gap"] == pytest.approx(0.05) and v["spread"] == pytest.approx(0.4)
    assert v["status"] == "within spread"
    one_seed = aggregate(_cells({"a": [0.9], "b": [0.1]}), ["a", "b"])
    assert verdict(one_seed, "probe_mean")["status"] == "one seed: no spread"
    # lower is better for times
    assert verdict(clear, "seconds_total")["status"] == "within spread"  # same times in both


def _plan(tmp_path, **fields):
    data = {"name": "t", "chain": ["tokenizer/debug/stage2_1_proximal", "tokenizer/debug/stage2_2_fsq"],
            "variants": [{"name": "a", "paper": 60.0}, {"name": "b", "paper": 70.0}], "seeds": [0, 1, 2],
            "work_dir": str(tmp_path / "work"), "report_dir": str(tmp_path / "report"), **fields}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    return build_plan(load_sweep(tmp_path / "t.yaml"))


def test_the_table_marks_wins_and_spreads_and_lists_missing_cells(tmp_path):
    plan = _plan(tmp_path)
    for cell in _cells({"a": [0.80, 0.82, 0.84], "b": [0.50, 0.52]}):
        folder = plan.sweep.work / "cells" / cell["variant"] / f"seed{cell['seed']}"
        folder.mkdir(parents=True)
        (folder / "cell.json").write_text(json.dumps(cell))
    results = collect(plan, "cell.json")
    assert results["missing"] == ["b/2"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| a | 60 | **0.820 ± 0.020** | 11.0 ± 1.0 |" in report
    assert "| b | 70 | 0.510 ± 0.014 | 10.5 ± 0.7 ≈ |" in report  # the faster mean, within the spread
    assert "- probe_mean: best a (0.820), runner-up b, gap 0.310, spread 0.034: win." in report
    assert "Our best, a, is a win beyond the seeds' spread and differs from the paper's best (b)." in report
    assert "Not finished (left out): b/2." in report


def test_slurm_launcher_writes_a_script_per_cell_and_an_array(tmp_path):
    plan = _plan(tmp_path, slurm={"nproc_per_node": 4, "sbatch": ["--gres=gpu:4", "--time=1:00:00"]})
    sbatch = write_slurm(plan, str(tmp_path / "t.yaml"), ["seeds=[0,1,2]"])
    jobs = tmp_path / "work" / "jobs"
    names = (jobs / "cells.txt").read_text().split()
    assert names == [f"{v}-seed{s}.sh" for v in ("a", "b") for s in (0, 1, 2)]
    text = sbatch.read_text()
    assert "#SBATCH --array=0-5" in text and "#SBATCH --gres=gpu:4" in text and "#SBATCH --time=1:00:00" in text
    script = (jobs / "b-seed1.sh").read_text()
    runs = [line for line in script.splitlines() if "mllm.cli sweep" in line]
    assert len(runs) == 3  # one torchrun per stage, then the metrics in one process
    assert all("torch.distributed.run --standalone --nproc_per_node \"$NPROC\"" in r for r in runs[:2])
    assert runs[0].endswith("seeds=[0,1,2]' --cell b/1 --stage stage2_1_proximal")
    assert runs[1].endswith("--cell b/1 --stage stage2_2_fsq")
    assert "torch.distributed.run" not in runs[2] and runs[2].endswith("--cell b/1")
    assert 'NPROC="${NPROC_PER_NODE:-4}"' in script
    for path in [sbatch, *(jobs / n for n in names)]:
        subprocess.run(["bash", "-n", str(path)], check=True)
