"""``viq demo``: the whole method on the bundled synthetic data set, on a CPU, with nothing downloaded.

Steps: generate the demo data -> train the debug tokenizer chain (stage 1, 2-1, 2-2, decoder) ->
extract codes offline -> train an MLLM from the codes and the same MLLM with the continuous tower ->
evaluate both on the test split -> measure the CPU speed-up -> write ``report.md``, ``results.json``,
``loss_curves.png``, ``reconstructions.png`` and ``speedup.png`` into the report directory.
Settings are a small recipe (``recipes/demo/default.yaml``; ``recipes/demo/ci.yaml`` is the CI size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mllm.config import load_recipe, resolve_recipe
from mllm.data.readers import dataset_images
from mllm.demo.data import generate_demo
from mllm.demo.figures import plot_losses, plot_reconstructions, read_loss_log, reconstruction_pairs
from mllm.stages.run import run_chain
from mllm.tools.bench import BenchConfig, machine_name, markdown, run_bench
from mllm.tools.evaluate import evaluate_mllm, tokenizer_metrics
from mllm.tools.extract import extract
from mllm.tools.inference import load_mllm, load_vis_tokenizer
from mllm.tools.prepare_llm import prepare_llm
from mllm.train.data_setup import resolve_image_settings
from mllm.train.trainer import run_training
from viq import ViQTokenizer
from viq.configio import load_config, to_dict

log = logging.getLogger(__name__)
DEFAULT_SETTINGS = "demo/default"


@dataclass(frozen=True)
class DemoConfig:
    work_dir: str = "runs/demo"
    report_dir: str = "demo-report"
    n_train: int = 8000
    n_val: int = 100
    n_test: int = 400
    seed: int = 0
    tokenizer_recipes: tuple[str, ...] = (
        "recipes/tokenizer/debug/stage1.yaml", "recipes/tokenizer/debug/stage2_1_proximal.yaml",
        "recipes/tokenizer/debug/stage2_2_fsq.yaml", "recipes/tokenizer/debug/decoder.yaml")
    tokenizer_overrides: tuple[str, ...] = ()
    mllm_recipe: str = "recipes/debug/sft_full.yaml"
    mllm_overrides: tuple[str, ...] = ()
    baseline_overrides: tuple[str, ...] = ("model.visual=continuous",)
    eval_limit: int | None = None  # evaluate on the first N test samples (None: all)
    bench_recipe: str | None = "recipes/bench/cpu.yaml"
    bench_overrides: tuple[str, ...] = ()
    n_reconstructions: int = 6
    # a `viq prepare-llm` name: the demo prepares that real pretrained LLM once into llm_dir (default
    # runs/<name>) and runs every tokenizer stage and both MLLMs on it (model.llm=DIR, llm_init=pretrained)
    pretrained_llm: str | None = None
    llm_dir: str | None = None


class Progress:
    """One line per step with its number and the wall time of the previous step."""

    def __init__(self, names: list[str]):
        self.names, self.times, self._t0, self._current = names, {}, None, None

    def start(self, name: str) -> None:
        self._close()
        self._current, self._t0 = name, time.perf_counter()
        log.info("[%d/%d] %s ...", self.names.index(name) + 1, len(self.names), name)

    def _close(self) -> None:
        if self._current is not None:
            self.times[self._current] = time.perf_counter() - self._t0
            log.info("      %s done in %.1f s", self._current, self.times[self._current])

    def finish(self) -> dict[str, float]:
        self._close()
        self._current = None
        return self.times


STEPS = ["generate data", "train tokenizer", "extract codes", "train MLLM from codes",
         "train continuous baseline", "evaluate", "benchmark", "report"]


def pretrained_llm_overrides(cfg: DemoConfig) -> list[str]:
    """The overrides that put the demo on its real pretrained LLM, prepared first if need be; none without one."""
    if cfg.pretrained_llm is None:
        return []
    llm_dir = prepare_llm(cfg.pretrained_llm, cfg.llm_dir or Path("runs") / cfg.pretrained_llm)
    return [f"model.llm={llm_dir}", "model.llm_init=pretrained"]


def _train_mllm(cfg: DemoConfig, data: dict, tok_dir: Path, out: Path, llm: list[str], extra: list[str]) -> Path:
    overrides = [f"data.train={data['train']}", "data.demo=false", f"model.tokenizer={tok_dir}",
                 f"train.output_dir={out}", *llm, *cfg.mllm_overrides, *extra]
    run_training(load_recipe(cfg.mllm_recipe, overrides))
    return out


def _recipe_image_settings(cfg: DemoConfig) -> dict:
    """The MLLM recipe's image settings, which the codes must be extracted with (training checks them)."""
    recipe = load_recipe(cfg.mllm_recipe, ["train.output_dir=unused", *cfg.mllm_overrides])
    return dataclasses.asdict(resolve_image_settings(recipe).data.image)


def _evaluate(model_dir: Path, data: dict, cfg: DemoConfig, out: Path) -> dict:
    model, text_tok, recipe = load_mllm(model_dir)
    vis = load_vis_tokenizer(model_dir) if model.visual.mode == "discrete" else None
    return evaluate_mllm(model, text_tok, data["test"], image_settings=recipe.data.image, vis_tokenizer=vis,
                         out_dir=out, limit=cfg.eval_limit,
                         progress=lambda done, total: log.info("      evaluated %d/%d", done, total))


WORK_MARKER = ".viq-demo-work"


def fresh_work_dir(work: Path) -> None:
    """Empty ``work`` for a fresh run (stale checkpoints or codes of an earlier run must not leak into it),
    refusing a non-empty directory that no demo made: work_dir=. must not wipe a checkout."""
    earlier_demo = (work / WORK_MARKER).is_file() or (work / "data" / "manifest.json").is_file()
    if work.is_dir() and any(work.iterdir()) and not earlier_demo:
        raise ValueError(f"work_dir {work} is not empty and no viq demo made it; choose a new or empty directory")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARKER).touch()


def run_demo(cfg: DemoConfig) -> dict:
    work, report = Path(cfg.work_dir), Path(cfg.report_dir)
    fresh_work_dir(work)
    report.mkdir(parents=True, exist_ok=True)
    prog = Progress(STEPS)
    results: dict = {"config": to_dict(cfg)}

    prog.start("generate data")
    llm = pretrained_llm_overrides(cfg)
    data = generate_demo(work / "data", n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)

    prog.start("train tokenizer")
    tok_overrides = [f"data.train={data['train']}", "data.demo=false", *llm, *cfg.tokenizer_overrides]
    tok_dir = run_chain(list(cfg.tokenizer_recipes), tok_overrides, root=work / "tokenizer")

    prog.start("extract codes")
    settings = _recipe_image_settings(cfg)
    codes_dir = work / "codes"
    results["extract"] = extract(str(tok_dir), data["train"], codes_dir, preprocess=settings, progress=True)

    prog.start("train MLLM from codes")
    viq_run = _train_mllm(cfg, data, tok_dir, work / "mllm-codes", llm, [f"data.codes={codes_dir}"])

    prog.start("train continuous baseline")
    base_run = _train_mllm(cfg, data, tok_dir, work / "mllm-continuous", llm, list(cfg.baseline_overrides))

    prog.start("evaluate")
    results["eval_codes"] = _evaluate(viq_run, data, cfg, work / "eval-codes")
    results["eval_continuous"] = _evaluate(base_run, data, cfg, work / "eval-continuous")
    tok = ViQTokenizer.from_pretrained(tok_dir).eval()
    test_images = dataset_images(data["test"], limit=max(cfg.n_reconstructions, 32))
    results["tokenizer"] = tokenizer_metrics(tok, test_images)

    prog.start("benchmark")
    if cfg.bench_recipe:
        bench_out = work / "bench"
        bench_cfg = load_config(BenchConfig, resolve_recipe(cfg.bench_recipe),
                                [f"out_dir={bench_out}", *cfg.bench_overrides])
        results["bench"] = run_bench(bench_cfg)
        shutil.copy(bench_out / "bench.png", report / "speedup.png")

    prog.start("report")
    runs = {"tokenizer " + p.name: p for p in sorted((work / "tokenizer").iterdir()) if p.is_dir()}
    runs.update({"MLLM from codes": viq_run, "MLLM continuous": base_run})
    machine = machine_name()
    stage_runs = {Path(r).stem: work / "tokenizer" / Path(r).stem for r in cfg.tokenizer_recipes}
    plot_losses({name: read_loss_log(p) for name, p in stage_runs.items()},
                {"from ViQ codes": read_loss_log(viq_run), "continuous tower": read_loss_log(base_run)},
                machine, report / "loss_curves.png")
    plot_reconstructions(*reconstruction_pairs(tok, test_images[: cfg.n_reconstructions]), machine,
                         report / "reconstructions.png")
    results["step_seconds"] = prog.finish()
    results["losses"] = {name: list(read_loss_log(run).losses) for name, run in runs.items()}
    (report / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (report / "report.md").write_text(render_report(results))
    log.info("demo report written to %s", report)
    return results


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _eval_table(results: dict) -> list[str]:
    codes, cont = results["eval_codes"], results["eval_continuous"]
    lines = ["| split: test | from ViQ codes | continuous tower |", "|---|---|---|",
             f"| VQA accuracy (exact match) | {_fmt(codes['vqa_accuracy'])} | {_fmt(cont['vqa_accuracy'])} |",
             f"| caption token F1 | {_fmt(codes['caption_f1'])} | {_fmt(cont['caption_f1'])} |"]
    for qtype in sorted(codes["per_type"]):
        a, b = codes["per_type"][qtype], cont["per_type"].get(qtype, {})
        lines.append(f"| {qtype} (n={a['n']}) exact match | {_fmt(a['exact_match'])} | "
                     f"{_fmt(b.get('exact_match'))} |")
    return lines


def render_report(results: dict) -> str:
    tok = results["tokenizer"]
    cfg = results["config"]
    lines = ["# ViQ demo report", "",
             f"Synthetic scenes (shapes, colours, positions, counts, words) at native resolutions: "
             f"{cfg['n_train']} training, {cfg['n_test']} test samples. Everything ran on this machine's CPU; "
             "nothing was downloaded.", "", "## MLLM accuracy", "", *_eval_table(results), "",
             "## Tokenizer (test images)", "", "| metric | value |", "|---|---|",
             f"| reconstruction PSNR (dB) | {_fmt(tok.get('psnr'), '.2f')} |",
             f"| mean-colour baseline PSNR (dB) | {_fmt(tok.get('psnr_mean_colour'), '.2f')} |",
             f"| SSIM | {_fmt(tok.get('ssim'))} |",
             f"| codebook usage | {_fmt(tok.get('codebook_usage'))} |",
             f"| code perplexity | {_fmt(tok.get('perplexity'), '.1f')} |",
             f"| bits per image | {_fmt(tok.get('bits_per_image'), '.0f')} |",
             f"| code stability (noise sigma 0.01) | {_fmt(tok.get('code_stability'))} |", "",
             "![reconstructions](reconstructions.png)", "", "![loss curves](loss_curves.png)", ""]
    if "bench" in results:
        bench_md = markdown(results["bench"]).split("\n", 1)[1]
        lines += ["## Training-step benchmark (CPU, scaled-down shapes)", bench_md, "", "![speed-up](speedup.png)", ""]
    lines += ["## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["step_seconds"].items()]
    total = sum(results["step_seconds"].values())
    lines += [f"| total | {total:.1f} |", ""]
    return "\n".join(lines)


def _settings_file(spec: str) -> Path:
    """A settings file, or a packaged one by name: ``ci`` and ``demo/ci`` both name recipes/demo/ci.yaml."""
    if Path(spec).is_file() or "/" in spec or spec.endswith(".yaml"):
        return resolve_recipe(spec)
    return resolve_recipe(f"demo/{spec}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viq demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=DEFAULT_SETTINGS,
                        help="demo settings: a YAML file or a packaged name (demo/default, demo/ci, or just ci)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. n_train=500")
    args = parser.parse_args(argv)
    if "=" in args.recipe:  # only overrides were given
        args.overrides.insert(0, args.recipe)
        args.recipe = DEFAULT_SETTINGS
    run_demo(load_config(DemoConfig, _settings_file(args.recipe), args.overrides))
    return 0
