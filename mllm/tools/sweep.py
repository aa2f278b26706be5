"""``viq sweep SWEEP.yaml``: a grid of recipe variants x seeds over a tokenizer stage chain, with metrics per cell
and a report (mean +- std over seeds per variant, best per column, the paper's numbers beside ours).

Every (variant, seed) cell runs the chain in its own folder ``work_dir/cells/<variant>/seed<seed>/``: stage k
writes ``<stage>/`` and, once it has finished, the marker ``<stage>.done.json`` (its wall time); the cell's
metrics go to ``cell.json`` when everything is done. Markers are written atomically, so a finished stage or
cell is never rerun; a stage that was killed halfway (a folder without its marker) runs again from the start
with ``train.overwrite_output_dir=true``, which the trainer applies (the killed run's files removed on the
main process, its stale lock taken over) before any rank writes.

    viq sweep SWEEP.yaml [key=value ...]        run the missing cells one after another here, then collect
    viq sweep SWEEP.yaml --dry-run              build every stage of every variant on the meta device
    viq sweep SWEEP.yaml --launcher slurm       write one script per cell and a SLURM array script instead
    viq sweep SWEEP.yaml --collect              write the report from the cells finished so far
    viq sweep SWEEP.yaml --cell VARIANT/SEED [--stage NAME]   one cell (or one of its stages; what the
                                                scripts run, under torchrun for the stages)

SWEEP.yaml is a file or a packaged sweep (sweeps/proximal); see mllm.tools.sweep_config for its fields and
how overrides reach the stages, recipes/sweeps/ for the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mllm.data.readers import dataset_images
from mllm.stages.run import dry_run, run_stage
from mllm.tools.evaluate import evaluate_mllm, tokenizer_metrics
from mllm.tools.inference import load_mllm, load_vis_tokenizer
from mllm.tools.probe import probe_tokenizer
from mllm.tools.sweep_config import MLLM_STAGE, Cell, Plan, Stage, SweepConfig, build_plan, load_sweep
from mllm.tools.sweep_launch import write_slurm
from mllm.tools.sweep_report import collect
from mllm.train.trainer import run_training
from viq import ViQTokenizer
from viq.configio import ConfigError

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
DONE_SUFFIX = ".done.json"
# (out_dir, n_train=, n_val=, n_test=, seed=) -> {split: annotation file}; mllm.demo.data.generate_demo,
# which the command line passes in (the demo package sits above the tools in the layers)
MakeDemo = Callable[..., dict]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_data(sweep: SweepConfig, make_demo: MakeDemo | None) -> dict | None:
    if sweep.demo is None:
        return None
    if make_demo is None:
        raise ValueError("this sweep has a demo: section, and no demo data generator was given")
    d = sweep.demo
    return make_demo(sweep.work / "data", n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, seed=d.seed)


def _training_data(sweep: SweepConfig, data: dict | None) -> dict | None:
    return data if sweep.demo is not None and sweep.demo.train else None


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_cell_stage(plan: Plan, cell: Cell, stage: Stage, data: dict | None) -> float:
    """Run one stage of a cell unless its marker says it finished; returns its wall time in seconds."""
    folder = cell.folder(plan.sweep.work)
    marker = folder / f"{stage.name}{DONE_SUFFIX}"
    if marker.is_file():
        return json.loads(marker.read_text())["seconds"]
    if (folder / stage.name).exists():
        log.info("cell %s: %s was interrupted; starting it again", cell.key, stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = plan.recipe(stage, cell, _training_data(plan.sweep, data))
    log.info("cell %s: stage %s", cell.key, stage.name)
    start = time.perf_counter()
    if stage.kind == MLLM_STAGE:
        run_training(cfg)
    else:
        run_stage(cfg)
    seconds = time.perf_counter() - start
    if _is_rank_zero():
        write_json_atomic(marker, {"seconds": seconds})
    return seconds


def cell_metrics(plan: Plan, cell: Cell, data: dict | None, seconds: dict[str, float]) -> dict:
    """The sweep's metrics of a cell whose stages have all finished."""
    sweep, folder = plan.sweep, cell.folder(plan.sweep.work)
    metrics: dict = {}
    out: dict = {"metrics": metrics}
    if "seconds" in sweep.metrics:
        metrics.update({f"seconds_{name}": s for name, s in seconds.items()})
        metrics["seconds_total"] = sum(seconds.values())
    wanted = set(sweep.metrics) - {"seconds", "vqa"}
    if wanted:
        tok = ViQTokenizer.from_pretrained(folder / plan.tokenizer_stage.name / "viq_tokenizer").eval()
        if wanted & {"psnr", "codebook", "stability"}:
            images = dataset_images(data["test"], limit=sweep.eval_images)
            stats = tokenizer_metrics(tok, images, noise_sigma=0.01, seed=0)
            keep = {"psnr": ("psnr", "psnr_mean_colour", "ssim"), "codebook": ("codebook_usage", "perplexity"),
                    "stability": ("code_stability",)}
            metrics.update({k: stats[k] for m in wanted & set(keep) for k in keep[m]})
        if "probe" in wanted:
            probe = probe_tokenizer(tok, data["train"], data["test"])
            out["probe"] = probe
            metrics.update({f"probe_{t}": r["accuracy"] for t, r in probe.items()})
            metrics["probe_mean"] = statistics.fmean(r["accuracy"] for r in probe.values())
    if "vqa" in sweep.metrics:
        model_dir = folder / MLLM_STAGE
        model, text_tok, recipe = load_mllm(model_dir)
        vis = load_vis_tokenizer(model_dir) if model.visual.mode == "discrete" else None
        result = evaluate_mllm(model, text_tok, data["test"], image_settings=recipe.data.image, vis_tokenizer=vis,
                               out_dir=folder / "eval-mllm")
        metrics["vqa_accuracy"] = result["vqa_accuracy"]
        out["vqa_per_type"] = {t: r["exact_match"] for t, r in result["per_type"].items()}
    return out


def run_cell(plan: Plan, cell: Cell, data: dict | None) -> dict:
    """All stages (those not yet finished) and the metrics of one cell; a finished cell is read back."""
    done = cell.folder(plan.sweep.work) / CELL_FILE
    if done.is_file():
        log.info("cell %s finished earlier; skipping", cell.key)
        return json.loads(done.read_text())
    seconds = {stage.name: run_cell_stage(plan, cell, stage, data) for stage in plan.stages}
    result = {"variant": cell.variant, "seed": cell.seed, "stage_seconds": seconds,
              **cell_metrics(plan, cell, data, seconds)}
    write_json_atomic(done, result)
    return result


def run_sweep(sweep: SweepConfig, make_demo: MakeDemo | None = None) -> dict:
    """Every cell not yet finished, one after another, then the report."""
    plan = build_plan(sweep)
    data = prepare_data(sweep, make_demo)
    for i, cell in enumerate(plan.cells):
        log.info("sweep %s: cell %d/%d (%s)", sweep.name, i + 1, len(plan.cells), cell.key)
        run_cell(plan, cell, data)
    return collect(plan, CELL_FILE)


def dry_run_sweep(sweep: SweepConfig) -> dict[str, dict[str, dict[str, int] | str]]:
    """Every stage recipe of every variant, resolved and built on the meta device (no weights, data or files):
    variant -> stage -> parameter counts (the MLLM stage is checked as a recipe only)."""
    plan = build_plan(sweep)
    out: dict = {}
    for variant in plan.variants:
        cell = Cell(variant.name, sweep.seeds[0])
        out[variant.name] = {}
        for stage in plan.stages:
            cfg = plan.recipe(stage, cell, None)
            out[variant.name][stage.name] = "recipe checked" if stage.kind == MLLM_STAGE else dry_run(cfg)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="viq sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file, or a packaged sweep by name (sweeps/proximal)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sweep file, e.g. seeds=[0]")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--collect", action="store_true", help="only write the report from the finished cells")
    mode.add_argument("--dry-run", action="store_true", help="check and build every stage, train nothing")
    mode.add_argument("--launcher", choices=("local", "slurm"), default="local",
                      help="local: run the cells here, one after another; slurm: write the job scripts")
    mode.add_argument("--cell", help="run one cell, VARIANT/SEED")
    p.add_argument("--stage", help="with --cell: run only this stage of the cell (no metrics)")
    return p


def main(argv: list[str] | None = None, make_demo: MakeDemo | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stage and not args.cell:
        parser().error("--stage needs --cell VARIANT/SEED")
    try:
        sweep = load_sweep(args.sweep, args.overrides)
        if args.dry_run:
            counts = dry_run_sweep(sweep)
            sweep.work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(sweep.work / "dry_run.json", counts)
            for variant, stages in counts.items():
                for stage, c in stages.items():
                    what = c if isinstance(c, str) else f"{c['total'] / 1e6:.1f}M parameters, " \
                                                        f"{c['trainable'] / 1e6:.1f}M trainable"
                    print(f"{variant:<24} {stage:<20} {what}")
            print(f"parameter counts per part: {sweep.work / 'dry_run.json'}")
        elif args.collect:
            report = collect(build_plan(sweep), CELL_FILE)
            print(report["report_dir"])
        elif args.cell:
            plan = build_plan(sweep)
            cell, data = plan.cell(args.cell), prepare_data(sweep, make_demo)
            if args.stage:
                run_cell_stage(plan, cell, plan.stage(args.stage), data)
            else:
                print(json.dumps(run_cell(plan, cell, data)["metrics"], indent=2))
        elif args.launcher == "slurm":
            plan = build_plan(sweep)
            prepare_data(sweep, make_demo)  # once here: the array's cells must not generate it concurrently
            print(write_slurm(plan, args.sweep, args.overrides))
        else:
            print(run_sweep(sweep, make_demo)["report_dir"])
    except (ConfigError, ValueError) as err:
        print(f"viq sweep: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0
