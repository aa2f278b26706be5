"""``viq data inspect RECIPE [key=value ...] [--n N]``: a recipe's training data as the trainer sees it.

The data set is built by the trainer's own code (mllm.train.data_setup.build_datasets: the same reader, chat
template, image settings, truncation, codes store and packing), with the text tokenizer alone: no LLM
weights, no training. For each of the first N kept samples it prints the rendered text with the supervised
tokens inside «…» and every image span collapsed to ``<image×K>``, and each image's patch grid and LLM
token count; then the packing plan (which samples share a pack, each pack's length against
``data.max_seq_len``) and the skip counts by reason. A new chat template or data set can so be checked
before a GPU day is spent on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from mllm.config import RecipeConfig, load_recipe
from mllm.data.chat import IGNORE_INDEX
from mllm.data.codes import tokenizer_identity
from mllm.data.descriptors import resolve_data
from mllm.data.layout import IMAGE_TOKEN, num_image_tokens
from mllm.data.phases import Phase
from mllm.model.llm import load_text_tokenizer
from mllm.model.viq_loader import load_viq, viq_dir
from mllm.stages.areas import area_phases
from mllm.stages.init import init_language_side
from mllm.tools.inference import quiet_logging
from mllm.train.data_setup import build_datasets, resolve_image_settings
from viq.config import PRESETS, preset
from viq.tokenizer import read_config

DATA_HELP = "Look at a recipe's training data before training on it."
INSPECT_HELP = """Render the first N training samples of a recipe as the trainer sees them: the text with the
supervised tokens inside «…» and image spans as <image×K>, each image's patch grid and token count, the
packing plan (samples per pack, pack lengths against data.max_seq_len) and the skip counts by reason.
Builds the data set with the recipe's text tokenizer only: no LLM weights are built and nothing trains.
  viq data inspect debug/sft_full data.train=my/train.json --n 5"""
SPAN_OPEN, SPAN_CLOSE = "«", "»"


@dataclass
class ImageView:
    path: str
    grid: tuple[int, int]
    tokens: int


@dataclass
class SampleView:
    index: int
    id: str
    length: int
    pack: int | None
    images: list[ImageView]
    text: str | None  # None: the sample could not be loaded (error says why)
    spans: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class DataReport:
    recipe: RecipeConfig
    image_source: str  # where data.image came from: stated, the codes, the defaults
    patch_size: int
    samples: list[SampleView]
    packs: list[list[int]] | None  # sample indices per pack, in the data set's pack order; None: no packing
    lengths: list[int]
    skips: dict


# ------------------------------------------------------------------------------------- building


def visual_patch_size(cfg: RecipeConfig) -> int:
    """The visual encoder's patch size, from configuration files alone (no weights are read)."""
    m, stage = cfg.model, cfg.stage
    if m.visual == "continuous" and m.siglip2 and (stage is None or stage.kind == "stage1"):
        from viq.convert.siglip2 import encoder_config_from_hf

        file = Path(m.siglip2) / "config.json"
        if not file.is_file():
            raise ValueError(f"model.siglip2 {m.siglip2!r}: {file} not found")
        return encoder_config_from_hf(json.loads(file.read_text())).patch_size
    spec, what = (stage.init, "stage.init") if stage is not None and stage.init else (m.tokenizer, "model.tokenizer")
    tok_cfg = preset(spec) if spec in PRESETS else read_config(viq_dir(spec, what))
    return tok_cfg.encoder.patch_size


def _text_tokenizer(cfg: RecipeConfig):
    continues = cfg.stage is not None and cfg.stage.llm_from_init
    return load_text_tokenizer(init_language_side(cfg)[0] if continues else cfg.model.llm, init=cfg.model.llm_init)


def _image_source(cfg: RecipeConfig) -> str:
    if cfg.data.image is not None:
        return "stated in the recipe"
    return f"inherited from the codes in {cfg.data.codes}" if cfg.data.codes else "the defaults (none stated)"


def inspect_recipe(cfg: RecipeConfig, n: int = 3, phase: int = 0) -> DataReport:
    """The report of ``cfg``'s training data set: its first ``n`` kept samples, its packs and skip counts;
    under stage.area_schedule, those of phase ``phase`` (each phase is prepared at its own image areas)."""
    if cfg.stage is not None and cfg.stage.kind == "decoder":
        raise ValueError("stage.kind=decoder trains the pixel decoder on images alone: it has no text samples")
    cfg = resolve_data(cfg, check_files=True)
    source = _image_source(cfg)
    cfg = resolve_image_settings(cfg)
    # training stops above data.max_skip_fraction; the report shows the skips instead, and says so
    limit = cfg.data.max_skip_fraction
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_skip_fraction=1.0))
    patch = visual_patch_size(cfg)
    tokenizer = _text_tokenizer(cfg)
    # the codes' tokenizer is checked as training checks it: codes of another tokenizer are refused here too
    identity = tokenizer_identity(load_viq(cfg.model.tokenizer, seed=cfg.train.seed, what="model.tokenizer")) \
        if cfg.data.codes else None
    train, _, _ = build_datasets(cfg, tokenizer, patch, _one_phase(cfg, phase), identity)
    ds = getattr(train, "dataset", train)  # a PackedDataset keeps the samples' data set
    packs = [list(p) for p in train.packs] if hasattr(train, "packs") else None
    pack_of = {i: k for k, members in enumerate(packs or []) for i in members}
    samples = [_sample_view(ds, i, pack_of.get(i), tokenizer) for i in range(min(n, len(ds.records)))]
    kept = len(ds.records)
    skips = {"kept": kept, "seen": getattr(ds, "seen", kept + sum(ds.skipped.values())),
             "truncated": ds.truncated, "skipped": dict(ds.skipped), "max_skip_fraction": limit}
    return DataReport(cfg, source, patch, samples, packs, list(ds.lengths), skips)


def _one_phase(cfg: RecipeConfig, k: int) -> list[Phase] | None:
    phases = area_phases(cfg)
    if phases is None and k == 0:
        return None
    if phases is None or not 0 <= k < len(phases):
        raise ValueError(f"--phase {k}: the recipe's training data has {len(phases or [None])} phase(s) "
                         "(stage.area_schedule)")
    return [Phase(1.0, phases[k].transform)]


def _sample_view(ds, i: int, pack: int | None, tokenizer) -> SampleView:
    rec = ds.records[i]
    images = [ImageView(str(ref.path), tuple(grid), num_image_tokens(*grid))
              for ref, grid in zip(rec.images, rec.grids, strict=True)]
    view = SampleView(i, rec.id, rec.length, pack, images, None)
    try:
        item = ds.load(i)  # as a training step gets it: expanded ids, labels, pixels or codes
    except (ValueError, OSError) as err:
        view.error = f"cannot be loaded (a training step skips it): {err}"
        return view
    view.text, view.spans = mark_supervised(tokenizer, item["input_ids"].tolist(), item["labels"].tolist())
    return view


def mark_supervised(tokenizer, input_ids: list[int], labels: list[int]) -> tuple[str, list[str]]:
    """(the text with each supervised run inside «…» and each image span as <image×K>, the supervised runs)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def kind(pair: tuple[int, int]) -> str:
        return "image" if pair[0] == image_id else "context" if pair[1] == IGNORE_INDEX else "supervised"

    parts, spans = [], []
    for k, run in groupby(zip(input_ids, labels, strict=True), key=kind):
        ids = [t for t, _ in run]
        if k == "image":
            parts.append(f"<image×{len(ids)}>")
            continue
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if k == "supervised":
            spans.append(text)
            text = f"{SPAN_OPEN}{text}{SPAN_CLOSE}"
        parts.append(text)
    return "".join(parts), spans


# ------------------------------------------------------------------------------------- rendering


def render_report(report: DataReport, max_packs: int = 20) -> str:
    """The report as plain text; ``max_packs`` packs of the plan are listed (0: all)."""
    d, img = report.recipe.data, report.recipe.data.image
    s = report.skips
    lines = [f"data.train: {d.train}" + (f"  (codes: {d.codes})" if d.codes else ""),
             f"images: mode={img.mode} area={img.area} multiple={img.multiple} min_area={img.min_area} "
             f"max_area={img.max_area}, {report.patch_size}-pixel patches; settings {report.image_source}",
             f"samples: {s['kept']} kept of {s['seen']} read, {s['truncated']} truncated; skipped: "
             + (", ".join(f"{r}: {c}" for r, c in sorted(s["skipped"].items())) or "none")]
    n_skipped = sum(s["skipped"].values())
    if n_skipped > s["max_skip_fraction"] * s["seen"]:
        lines.append(f"training would stop here: {n_skipped} of {s['seen']} samples skipped, more than "
                     f"data.max_skip_fraction={s['max_skip_fraction']}")
    lines.append(_packing_summary(report))
    for view in report.samples:
        lines += ["", *_render_sample(view)]
    lines += ["", *_render_plan(report, max_packs)]
    return "\n".join(lines)


def _packing_summary(report: DataReport) -> str:
    d = report.recipe.data
    if report.packs is None:
        return (f"packing: off (data.packing=false): padded batches of {report.recipe.train.per_device_batch_size} "
                f"samples of <= {d.max_seq_len} tokens, in the Trainer's shuffled order")
    fill = sum(report.lengths) / max(1, len(report.packs) * d.max_seq_len)
    return f"packing: {len(report.lengths)} samples in {len(report.packs)} packs of <= {d.max_seq_len} tokens, " \
           f"{fill:.1%} filled"


def _render_sample(view: SampleView) -> list[str]:
    where = f", pack {view.pack}" if view.pack is not None else ""
    n = len(view.images)
    out = [f"== sample {view.index} id={view.id!r}: {view.length} tokens, {n} image{'' if n == 1 else 's'}{where}"]
    out += [f"image {k}: grid {im.grid[0]}x{im.grid[1]} -> {im.tokens} tokens  {im.path}"
            for k, im in enumerate(view.images, 1)]
    out.append(view.error if view.error else view.text)
    return out


def _render_plan(report: DataReport, max_packs: int) -> list[str]:
    if report.packs is None:
        return ["packing plan: none (data.packing=false)"]
    limit = report.recipe.data.max_seq_len
    shown = report.packs if max_packs <= 0 else report.packs[:max_packs]
    out = [f"packing plan, in the data set's pack order (the Trainer's sampler shuffles the packs again); "
           f"sample (tokens), pack length <= {limit}:"]
    for k, members in enumerate(shown):
        total = sum(report.lengths[i] for i in members)
        out.append(f"pack {k}: {total}/{limit} tokens: " + ", ".join(f"{i} ({report.lengths[i]})" for i in members))
    if len(shown) < len(report.packs):
        out.append(f"... {len(report.packs) - len(shown)} more packs (--packs 0 lists all)")
    return out


# ------------------------------------------------------------------------------------- command line


def data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viq data", description=DATA_HELP)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("inspect", help="render the first training samples as the trainer sees them", add_help=False)
    return parser


def inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viq data inspect", description=INSPECT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML or packaged recipe name (debug/sft_full)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for viq train")
    parser.add_argument("--n", type=int, default=3, help="samples to render (default 3)")
    parser.add_argument("--packs", type=int, default=20, help="packs of the plan to list (default 20; 0: all)")
    parser.add_argument("--phase", type=int, default=0,
                        help="under stage.area_schedule, the phase to show (default 0, the first)")
    parser.add_argument("--verbose", action="store_true", help="show the library's log messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``viq data ACTION ...``; ``inspect`` prints the report, a bad recipe or data one line on stderr (1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "inspect":
        data_parser().parse_args(argv)  # --help, or the usage error
        return 2
    args = inspect_parser().parse_intermixed_args(argv[1:])
    if args.n < 0:
        inspect_parser().error(f"--n must be >= 0, got {args.n}")
    quiet_logging(args.verbose)
    try:
        report = inspect_recipe(load_recipe(args.recipe, args.overrides), n=args.n, phase=args.phase)
    except (ValueError, OSError) as err:
        print(f"viq data inspect: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(render_report(report, args.packs))
    return 0
