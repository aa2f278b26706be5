"""DeepSpeed ZeRO helpers of the training path: the DeepSpeed config and a resumed checkpoint held against the
recipe and the launch before any model is built, random weights built whole, partitioned ones gathered, the
optimizer of ZeRO-Offload."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainingArguments

from mllm.config import RecipeConfig, resolve_dtype, resolve_recipe
from mllm.model.llm import random_shape
from viq.configio import ConfigError

AUTO = "auto"  # a DeepSpeed value the Trainer fills in from the recipe
ZERO3_RANK_FILES = "zero_pp_rank_*_mp_rank_00_model_states.pt"  # one per rank (ZeRO-1/2 write one in all)


def load_zero_config(spec: str) -> tuple[Path, dict]:
    """The DeepSpeed config named by train.deepspeed (a path or a shipped recipes/deepspeed/*.json) and its path."""
    path = resolve_recipe(spec)
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.deepspeed={spec!r}: cannot read {path} as JSON ({err})") from err


def check_zero_config(ds: dict, cfg: RecipeConfig, world_size: int, cuda: bool, source: str) -> None:
    """Refuse a DeepSpeed config (``ds``, read from ``source``) that contradicts the recipe or the launch: a batch
    size, accumulation or total batch other than the recipe's at this world size, or a half precision the run
    does not train in. The Trainer finds some of these only after the model is built, some never ("auto"
    values are the recipe's, so they always agree)."""
    t = cfg.train
    for key, name, value in (("train_micro_batch_size_per_gpu", "train.per_device_batch_size", t.per_device_batch_size),
                             ("gradient_accumulation_steps", "train.grad_accum", t.grad_accum)):
        got = ds.get(key, AUTO)
        if got != AUTO and got != value:
            raise ConfigError(f"{source} sets {key}={got!r} but the recipe has {name}={value}: set it to "
                              f'"{AUTO}" (the recipe\'s value) or to {value}')
    total = ds.get("train_batch_size", AUTO)
    per_rank = t.per_device_batch_size * t.grad_accum
    if total != AUTO and (not isinstance(total, int) or total % world_size):
        raise ConfigError(f"{source} sets train_batch_size={total!r}, which the launch's world size of {world_size} "
                          f"ranks does not divide: launch a number of ranks that divides it, or set it to "
                          f'"{AUTO}" (train.per_device_batch_size x train.grad_accum x ranks)')
    if total != AUTO and total != per_rank * world_size:
        raise ConfigError(f"{source} sets train_batch_size={total} but the recipe gives {per_rank * world_size} on "
                          f"{world_size} ranks (train.per_device_batch_size={t.per_device_batch_size} x "
                          f"train.grad_accum={t.grad_accum} x {world_size}): set it to \"{AUTO}\", or the recipe's "
                          f"batch size and accumulation to multiply to {total // world_size} per rank")
    dtype = resolve_dtype(cfg.model.dtype, cuda)
    for key, recipe_on in (("bf16", dtype == torch.bfloat16), ("fp16", False)):
        enabled = ds.get(key, {}).get("enabled", AUTO)
        if enabled == AUTO:
            continue
        if enabled and not cuda:
            raise ConfigError(f"{source} sets {key}.enabled=true but this run has no GPU, where it trains in fp32: "
                              f'set it to "{AUTO}"')
        if bool(enabled) != recipe_on:
            raise ConfigError(f"{source} sets {key}.enabled={str(enabled).lower()} but the recipe's "
                              f"model.dtype={cfg.model.dtype!r} trains in {str(dtype).removeprefix('torch.')} here: "
                              f'set it to "{AUTO}" (the recipe\'s precision)')


def check_resume_world_size(ckpt: str | Path, world_size: int, ds: dict) -> None:
    """Refuse to resume a ZeRO-3 checkpoint on another number of ranks than wrote it, before any model is built.
    Its optimizer state is split in one file per rank, which DeepSpeed loads only at that world size (and
    refuses later, after the model is built, without saying what to do); its universal format loads at any."""
    ckpt = Path(ckpt)
    tag_file = ckpt / "latest"
    if ds.get("checkpoint", {}).get("load_universal"):
        if not (ckpt / "latest_universal").is_file():
            raise ConfigError(f'the DeepSpeed config loads universal checkpoints ("load_universal": true) but {ckpt} '
                              "has none (no latest_universal): convert it with `python -m "
                              "deepspeed.checkpoint.ds_to_universal --input_folder CKPT/global_stepN --output_folder "
                              "CKPT/global_stepN_universal`, or resume without load_universal")
        return
    if not tag_file.is_file():
        return
    tag = tag_file.read_text().strip()
    saved = len(list((ckpt / tag).glob(ZERO3_RANK_FILES)))
    if saved and saved != world_size:
        raise ConfigError(
            f"{ckpt} holds a ZeRO-3 state written by {saved} ranks, but this launch has {world_size}: resume on "
            f"{saved} ranks, or convert it to DeepSpeed's universal checkpoint, which loads on any number: "
            f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt / tag} --output_folder "
            f'{ckpt / (tag + "_universal")}` and add "checkpoint": {{"load_universal": true}} to the DeepSpeed config')


def loads_universal(args: TrainingArguments) -> bool:
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    return hf_ds is not None and bool(hf_ds.get_value("checkpoint.load_universal"))


def repair_universal_load(optimizer: torch.optim.Optimizer, fresh: list[dict], base_lrs: list[float],
                          lrs: list[float]) -> None:
    """Undo two things DeepSpeed's ZeRO-3 universal checkpoint loader (0.19) does to a resumed optimizer:
    - it gives every parameter group the hyperparameters of the first ("generally the same"), but ours differ per
      part (learning rate, no weight decay on norms and biases): put back ``fresh`` (each group's as built) and
      the resumed scheduler's ``base_lrs`` and ``lrs``, which hold the run's point in its schedule;
    - it hands every group one and the same ``step`` tensor, which torch's Adam then counts up once per group and
      optimizer step, skewing the bias correction (one rank resumed from two: loss 7.435 instead of 7.424 at
      the first step after the resume): each group gets its own."""
    groups = optimizer.param_groups
    if not len(groups) == len(fresh) == len(base_lrs) == len(lrs):
        raise RuntimeError(f"resumed optimizer has {len(groups)} parameter groups, the run built {len(fresh)}")
    for group, hyper, base, lr in zip(groups, fresh, base_lrs, lrs, strict=True):
        group.update(hyper, initial_lr=base, lr=lr)
    # keyed by ZeRO's flat fp32 partitions, one per group (the groups' "params" stay empty between steps)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def random_llm_outside_zero_init(cfg: RecipeConfig, args: TrainingArguments) -> Iterator[None]:
    """Under ZeRO-3, transformers builds the LLM inside ``deepspeed.zero.Init``: each module is partitioned as
    it is made and its random initialisation runs gathered, module by module, drawing the generator in
    another order than the plain build (step-1 loss 7.834 against 7.716 for the same seed). A random-weight
    LLM (``model.llm_init: random``) is therefore built whole, as without ZeRO-3, and partitioned by
    ``deepspeed.initialize`` as the visual side and the projector already are: the same initial weights
    whatever the stage and world size, at the cost of one full copy of the model per rank while it is built.
    Pretrained weights come from their files either way and keep the partitioned build."""
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is None or not hf_ds.is_zero3() or not random_shape(cfg.model.llm, cfg.model.llm_init):
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_ds)


def offloads_optimizer(args: TrainingArguments) -> bool:
    """Whether the run's DeepSpeed config keeps the optimizer state off the accelerator (ZeRO-Offload)."""
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    return hf_ds is not None and hf_ds.get_value("zero_optimization.offload_optimizer.device") in ("cpu", "nvme")


def cpu_adamw(groups: list[dict], **hyper) -> torch.optim.Optimizer:
    """AdamW over ``groups`` for ZeRO-Offload: DeepSpeed refuses a torch optimizer there and documents its own
    CPU Adam (the same decoupled weight decay as torch.optim.AdamW in ``adamw_mode``, vectorised, several times
    faster on the CPU). Its first use compiles a C++ op with the system's g++ and ninja (about 2.5 CPU-minutes,
    cached in torch's extension folder); ``DS_BUILD_CPU_ADAM=1 pip install deepspeed`` builds it at install
    time instead."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, modify: bool = False) -> Iterator[None]:
    """The whole tensors of ``module``'s parameters inside the block, also where ZeRO-3 has partitioned them
    (elsewhere a no-op). Every rank must enter: the gathering is collective. ``modify``: what rank 0 writes
    into them is partitioned back on exit."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
