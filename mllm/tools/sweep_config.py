"""The sweep file of ``viq sweep`` and its plan: which stages every (variant, seed) cell runs, with which overrides.

A sweep file (recipes/sweeps/*.yaml) names a base chain of tokenizer stage recipes (plus optionally an MLLM
recipe trained on the chain's tokenizer), the variants (a list, or a grid whose cross product makes them),
the seeds and the metrics. Overrides are the recipes' dotted ``key=value`` pairs:

- ``key=value`` goes to every stage whose recipe (its ``base:`` files merged) sets ``key``; a key no recipe
  of the chain sets is an error naming the key and the stages;
- ``STAGE:key=value`` goes to that stage only (STAGE is the recipe's file name without .yaml, ``mllm`` for
  the MLLM recipe); use it for a key a recipe leaves at its default, or to change one stage of several.

Every cell's stage recipes are built (and so validated) before anything runs.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mllm.config import RecipeConfig, load_recipe, resolve_recipe
from viq.configio import ConfigError, load_config, load_yaml, parse_override

MLLM_STAGE = "mllm"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,-]*$")  # a variant name is a folder name


@dataclass(frozen=True)
class DemoData:
    """The bundled demo set, generated once into ``work_dir/data`` (mllm.demo.data.generate_demo)."""

    n_train: int = 600
    n_val: int = 6
    n_test: int = 150
    seed: int = 0
    # true: every stage trains on it; false: only the metrics use it (the recipes' own data trains)
    train: bool = True


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()
    paper: float | None = None  # the paper's score for this setting (viq-paper.md §3.5), shown beside ours


@dataclass(frozen=True)
class Slurm:
    """What ``--launcher slurm`` writes into the array script and runs every stage with."""

    nproc_per_node: int = 1  # torchrun processes per cell (one per GPU)
    sbatch: tuple[str, ...] = ()  # extra ``#SBATCH`` options, e.g. "--gres=gpu:8", "--time=24:00:00"


@dataclass(frozen=True)
class SweepConfig:
    name: str
    chain: tuple[str, ...]  # tokenizer stage recipes in order; each starts from the previous one's output
    mllm: str | None = None  # an MLLM recipe trained on each cell's tokenizer (needed by the vqa metric)
    overrides: tuple[str, ...] = ()  # for every cell (e.g. fewer steps)
    variants: tuple[Variant, ...] = ()
    grid: dict[str, list] | None = None  # override key -> values: one variant per combination
    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = ("psnr", "codebook", "stability", "probe", "seconds")
    demo: DemoData | None = field(default_factory=DemoData)
    eval_images: int = 64  # test images of the reconstruction and code metrics
    work_dir: str | None = None  # null: runs/sweep-<name>
    report_dir: str | None = None  # null: sweep-report/<name>
    paper_metric: str | None = None  # what the variants' ``paper`` numbers measure
    slurm: Slurm = field(default_factory=Slurm)

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise ConfigError(f"sweep name {self.name!r} must be a folder name (letters, digits, ._=+,-)")
        if not self.chain:
            raise ConfigError("a sweep needs a chain: at least one tokenizer stage recipe")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list without repeats, got {list(self.seeds)}")
        if self.eval_images <= 0:
            raise ConfigError(f"eval_images must be positive, got {self.eval_images}")
        if self.slurm.nproc_per_node <= 0:
            raise ConfigError(f"slurm.nproc_per_node must be positive, got {self.slurm.nproc_per_node}")

    @property
    def work(self) -> Path:
        return Path(self.work_dir or f"runs/sweep-{self.name}")

    @property
    def report(self) -> Path:
        return Path(self.report_dir or f"sweep-report/{self.name}")


# metric name -> (what it needs, the result columns it gives; "{stage}" expands per stage)
METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "psnr": (("codes", "demo"), ("psnr", "psnr_mean_colour", "ssim")),
    "codebook": (("codes", "demo"), ("codebook_usage", "perplexity")),
    "stability": (("codes", "demo"), ("code_stability",)),
    "probe": (("codes", "demo"), ("probe_mean", "probe_colour", "probe_shape", "probe_count", "probe_position",
                                  "probe_word")),
    "seconds": ((), ("seconds_total",)),
    "vqa": (("mllm", "demo"), ("vqa_accuracy",)),
}
NEEDS = {
    "codes": "a stage that makes codes (stage.kind fsq or decoder) in the chain",
    "demo": "the demo data (a `demo:` section) to measure on",
    "mllm": "an MLLM stage (`mllm: RECIPE`, trained on each cell's tokenizer)",
}


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: Path
    kind: str  # stage.kind, or "mllm"


@dataclass(frozen=True)
class Cell:
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.seed}"

    def folder(self, work: Path) -> Path:
        return work / "cells" / self.variant / f"seed{self.seed}"


@dataclass
class Plan:
    sweep: SweepConfig
    stages: list[Stage]
    # variant name -> stage name -> overrides of that stage (sweep-wide ones first, then the variant's)
    overrides: dict[str, dict[str, list[str]]]
    variants: list[Variant]

    @property
    def cells(self) -> list[Cell]:
        return [Cell(v.name, s) for v in self.variants for s in self.sweep.seeds]

    def cell(self, key: str) -> Cell:
        for c in self.cells:
            if c.key == key:
                return c
        raise ConfigError(f"--cell {key!r} is not a cell of sweep {self.sweep.name} (VARIANT/SEED, one of: "
                          f"{', '.join(c.key for c in self.cells)})")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"--stage {name!r} is not a stage of the chain ({', '.join(s.name for s in self.stages)})")

    @property
    def tokenizer_stage(self) -> Stage:
        """The last tokenizer stage: its viq_tokenizer is the cell's product."""
        return [s for s in self.stages if s.kind != MLLM_STAGE][-1]

    def system_overrides(self, stage: Stage, cell: Cell, data: dict | None) -> list[str]:
        """What the runner sets for every stage of a cell: its output folder (cleared of a killed run's files),
        the previous stage's output, the seed and the generated demo data."""
        folder = cell.folder(self.sweep.work)
        out = [f"train.output_dir={folder / stage.name}", f"train.seed={cell.seed}",
               "train.overwrite_output_dir=true"]  # a folder there is a killed run's: start it again
        index = self.stages.index(stage)
        if stage.kind == MLLM_STAGE:
            out.append(f"model.tokenizer={folder / self.tokenizer_stage.name / 'viq_tokenizer'}")
        elif index > 0:
            out.append(f"stage.init={folder / self.stages[index - 1].name}")
        if data is not None:
            out += [f"data.train={data['train']}", "data.demo=false"]
        return out

    def recipe(self, stage: Stage, cell: Cell, data: dict | None) -> RecipeConfig:
        extra = [*self.overrides[cell.variant][stage.name], *self.system_overrides(stage, cell, data)]
        try:
            return load_recipe(stage.recipe, extra)
        except ConfigError as err:
            raise ConfigError(f"variant {cell.variant!r}, stage {stage.name}: {err}") from None


def _has_key(data: dict, keys: list[str]) -> bool:
    node = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def _stages(sweep: SweepConfig) -> tuple[list[Stage], dict[str, dict]]:
    stages, raw = [], {}
    entries = [(Path(r).stem, r) for r in sweep.chain] + ([(MLLM_STAGE, sweep.mllm)] if sweep.mllm else [])
    for name, spec in entries:
        if name in raw:
            raise ConfigError(f"two recipes of the chain are both named {name!r}: stage names must differ")
        path = resolve_recipe(spec)
        data = load_yaml(path)
        kind = MLLM_STAGE if name == MLLM_STAGE else (data.get("stage") or {}).get("kind")
        if kind is None:
            raise ConfigError(f"chain recipe {spec} has no stage section (stage.kind): the chain holds tokenizer "
                              "stages; an MLLM recipe goes under `mllm:`")
        stages.append(Stage(name, path, kind))
        raw[name] = data
    return stages, raw


def _route(item: str, stages: list[Stage], raw: dict[str, dict]) -> list[str]:
    """The stages an override goes to (see the module doc)."""
    key = item.split("=", 1)[0]
    names = [s.name for s in stages]
    if ":" in key:
        stage, _, _ = key.partition(":")
        if stage not in names:
            raise ConfigError(f"override {item!r} names stage {stage!r}, which is not in the chain "
                              f"({', '.join(names)})")
        return [stage]
    keys, _ = parse_override(item)
    targets = [n for n in names if _has_key(raw[n], keys)]
    if not targets:
        raise ConfigError(f"override key {key!r} is set by no stage of the chain ({', '.join(names)}); "
                          f"write STAGE:{key}=VALUE to set it in one stage where its recipe leaves the default")
    return targets


def _grid_variants(grid: dict[str, list]) -> list[Variant]:
    if not grid:
        return []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
    out = []
    for combo in itertools.product(*grid.values()):
        parts = [(key, value) for key, value in zip(grid, combo, strict=True)]
        label = ",".join(f"{k.split(':')[-1].split('.')[-1]}={_label(v)}" for k, v in parts)
        name = label.split("=", 1)[1] if len(parts) == 1 else label
        out.append(Variant(name, tuple(f"{k}={json.dumps(v)}" for k, v in parts)))
    return out


def _label(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, list) else str(value).lower()


def check_metrics(sweep: SweepConfig, stages: list[Stage]) -> None:
    have = {"codes": any(s.kind in ("fsq", "decoder") for s in stages),
            "demo": sweep.demo is not None, "mllm": sweep.mllm is not None}
    for metric in sweep.metrics:
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        missing = [need for need in METRICS[metric][0] if not have[need]]
        if missing:
            raise ConfigError(f"metric {metric!r} needs {' and '.join(NEEDS[m] for m in missing)}")


def build_plan(sweep: SweepConfig) -> Plan:
    """Variants, stages and per-stage overrides of ``sweep``; every cell's stage recipe is built once (as for
    seed 0: the seed is the only difference between a variant's cells) so that a bad value fails here."""
    stages, raw = _stages(sweep)
    check_metrics(sweep, stages)
    variants = list(sweep.variants) + _grid_variants(sweep.grid or {})
    if not variants:
        raise ConfigError(f"sweep {sweep.name} has no variants: give `variants:` or a non-empty `grid:`")
    seen: set[str] = set()
    for v in variants:
        if not NAME_RE.match(v.name):
            raise ConfigError(f"variant name {v.name!r} must be a folder name (letters, digits, ._=+,-)")
        if v.name in seen:
            raise ConfigError(f"variant name {v.name!r} appears twice: every variant needs its own name")
        seen.add(v.name)
    overrides: dict[str, dict[str, list[str]]] = {}
    for v in variants:
        per_stage: dict[str, list[str]] = {s.name: [] for s in stages}
        for item in (*sweep.overrides, *v.overrides):
            for target in _route(item, stages, raw):
                per_stage[target].append(item.split(":", 1)[1] if ":" in item.split("=", 1)[0] else item)
        overrides[v.name] = per_stage
    plan = Plan(sweep, stages, overrides, variants)
    data = {"train": plan.sweep.work / "data" / "train.json"} if sweep.demo and sweep.demo.train else None
    for v in variants:
        for stage in stages:
            plan.recipe(stage, Cell(v.name, sweep.seeds[0]), data)
    return plan


def load_sweep(path: str | Path, overrides=()) -> SweepConfig:
    """A sweep file (or a packaged one by name, e.g. ``sweeps/proximal``) with dotted overrides."""
    return load_config(SweepConfig, resolve_recipe(path), overrides)
