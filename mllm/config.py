"""The MLLM training recipe as a tree of frozen dataclasses (YAML is its serialisation, viq.configio).

Stable override keys: ``model.llm`` (preset name, local HF directory or hub id), ``train.output_dir``,
``train.max_steps``. A required field has no default. Values that depend on the machine ("auto" dtype
and attention) are resolved in one place: :func:`resolve_dtype` and :func:`resolve_attention`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from viq.config import PRESETS as TOKENIZER_PRESETS
from viq.config import PreprocessConfig
from viq.configio import ConfigError, dump_yaml, load_config

Part = Literal["tower", "head", "embedder", "projector", "llm", "decoder"]
# "decoder": the ViQ pixel decoder, trained by the tokenizer stages only (mllm.stages)
PARTS: tuple[str, ...] = ("tower", "head", "embedder", "projector", "llm", "decoder")


@dataclass(frozen=True)
class ModelConfig:
    llm: str  # preset name (mllm.model.llm.LLM_PRESETS), local HF directory, or hub id
    tokenizer: str  # ViQ tokenizer preset name (viq.config.PRESETS) or a ViQ tokenizer directory
    visual: Literal["continuous", "discrete"] = "discrete"
    siglip2: str | None = None  # SigLIP2 HF directory that replaces the tower of a continuous run
    use_head: bool = False  # continuous: run the quantization head too (the LLM sees quantized features)
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype; trainable weights stay fp32
    # the projector's 2x2 pooling: the reference's softmax pool, or concat (keeps each patch's place)
    projector_pool: Literal["softmax", "concat"] = "softmax"
    # what a preset in model.llm means: its published checkpoint, or its shape with seeded random weights
    # (benchmarks, dry runs, tests, debug twins). Random weights are never a fallback: a preset without a
    # checkpoint (debug, demo) needs "random" said here. A directory or hub id always loads its weights
    llm_init: Literal["pretrained", "random"] = "pretrained"
    # the same for model.tokenizer (and stage.init): a ViQ preset (debug, so400m, g) is an architecture with seeded
    # random weights, so a run that starts from one says "random" here, unless model.siglip2 supplies the tower
    tokenizer_init: Literal["pretrained", "random"] = "pretrained"


@dataclass(frozen=True)
class TrainableConfig:
    tower: bool = False
    head: bool = False
    embedder: bool = False
    projector: bool = True
    llm: Literal["full", "lora", "frozen"] = "full"


@dataclass(frozen=True)
class LrConfig:
    """Per-part learning rates; null means ``train.learning_rate``."""

    projector: float | None = None
    tower: float | None = None
    head: float | None = None
    embedder: float | None = None
    llm: float | None = None
    decoder: float | None = None


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    dora: bool = False
    targets: tuple[str, ...] | None = None  # null: mllm.model.llm.LORA_TARGETS of the LLM family

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be positive, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DataConfig:
    train: str  # annotation file or directory (mllm.data.readers.read_samples)
    image_root: str | None = None  # null: the annotation file's folder
    eval: str | None = None
    max_seq_len: int = 2048
    packing: bool = True  # padding-free packing (one packed row per device batch)
    # how every image becomes pixels (viq.image.preprocess), for training, extraction, evaluation and inference;
    # null: the codes' own settings when data.codes is set, else PreprocessConfig's defaults. Training makes it
    # concrete before it saves the recipe (mllm.train.data_setup.resolve_image_settings), so the saved model
    # records what it was trained on; a stated value must equal the codes' settings
    image: PreprocessConfig | None = None
    strict: bool = False  # raise on a bad sample or record instead of skipping it (counted, logged)
    max_skip_fraction: float = 0.1  # stop when more than this fraction of the samples is skipped
    codes: str | None = None  # a `viq extract` output directory: train from stored codes, no image decoding
    demo: bool = False  # generate the bundled demo data set into train's folder when train is missing
    demo_samples: int = 1000  # training samples of a generated demo set (val and test get a tenth)

    def __post_init__(self):
        for name in ("max_seq_len", "demo_samples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        for name in ("area", "multiple"):
            if self.image is not None and getattr(self.image, name) <= 0:
                raise ConfigError(f"data.image.{name} must be positive, got {getattr(self.image, name)}")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    max_steps: int = -1  # > 0 overrides num_epochs
    num_epochs: float = 1.0
    per_device_batch_size: int = 1  # packs (packing) or samples (padded) per device and micro-step
    grad_accum: int = 1
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    calibrate_projector: bool = False  # start proj1 from the data (Projector.calibrate); not on resume
    calibration_samples: int = 64
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_steps: int | None = None  # null: evaluate data.eval (if set) only at the end
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a ZeRO json (recipes/deepspeed/zero{1,2,3}.json)
    report_to: tuple[Literal["jsonl", "wandb", "tensorboard"], ...] = ("jsonl",)
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "viq"
    dataloader_workers: int = 0
    resume: bool = False  # continue from the newest complete checkpoint-* in output_dir
    resume_from_checkpoint: str | None = None  # or from this checkpoint directory
    overwrite_output_dir: bool = False  # a fresh run deletes the run files already in output_dir
    progress_bar: bool = True
    # seconds a collective (a barrier, a gradient reduction, a ZeRO gather) may wait for the other ranks before
    # the run ends with an error: a dead or diverged rank then stops the job instead of hanging it. Every wait
    # of a sound run must fit: rank 0's data preparation (the others wait), a checkpoint save (ZeRO-3 gathers,
    # rank 0 writes)
    ddp_timeout: int = 600

    def __post_init__(self):
        for name in ("per_device_batch_size", "grad_accum", "logging_steps", "save_steps", "calibration_samples",
                     "ddp_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ConfigError(f"set train.max_steps > 0 or train.num_epochs > 0 (got {self.max_steps}, "
                              f"{self.num_epochs})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if self.dataloader_workers < 0:
            raise ConfigError(f"train.dataloader_workers must be >= 0, got {self.dataloader_workers}")


StageKind = Literal["stage1", "proximal", "fsq", "decoder"]
MLLM_STAGES = ("stage1", "proximal", "fsq")  # stages trained through the LLM (the decoder stage is not)


def _check_area_range(key: str, area_range: tuple[int, int] | None) -> None:
    if area_range is not None and not 0 < area_range[0] <= area_range[1]:
        raise ConfigError(f"{key} must be [min, max] with 0 < min <= max, got {list(area_range)}")


@dataclass(frozen=True)
class AreaPhase:
    """One phase of a resolution schedule (stage.area_schedule): the images of the optimizer steps before
    ``until`` (a fraction of the run's steps, so of its tokens when packing) get areas in ``area_range``."""

    until: float
    area_range: tuple[int, int]  # pixels per image, [min, max], drawn log-uniformly as stage.area_range

    def __post_init__(self):
        if not 0 < self.until <= 1:
            raise ConfigError(f"stage.area_schedule: until must be in (0, 1], got {self.until}")
        _check_area_range("stage.area_schedule: area_range", self.area_range)


@dataclass(frozen=True)
class StageConfig:
    """A ViQ tokenizer training stage (mllm.stages); absent from ordinary MLLM recipes.

    stage1: text-aligned pre-training of the encoder (LM + distillation); proximal (2-1): the head with
    an L-inf (or l2/tanh/none) bottleneck; fsq (2-2): the FSQ head; decoder: the pixel decoder on the
    frozen tokenizer. Each stage writes ``train.output_dir/viq_tokenizer``, which the next one's
    ``init`` names (the output dir itself is accepted too).
    """

    kind: StageKind
    init: str | None = None  # previous stage's output dir, a ViQ tokenizer dir or preset; null: model.tokenizer
    # original: the chain's starting tower (stage 1's model.siglip2 or init, recorded in every stage's report);
    # previous: a frozen copy of this stage's initial encoder; or a ViQ dir/preset or SigLIP/SigLIP2 HF dir
    teacher: str = "original"
    teacher_resolution: int = 384  # the teacher sees every image bilinearly resized to this square
    pos_grid: int | None = None  # stage1: resample the tower's position table once to this side (the reference: 128)
    distill_weight: float = 10.0
    recon_weight: float = 1.0  # proximal, fsq (the decoder stage always reconstructs)
    feat_rec_weight: float = 0.0  # head features before the affine regressed onto its normalised input
    quantizer: Literal["fsq", "linf", "l2", "tanh", "none"] | None = None  # null: linf (proximal), fsq (fsq)
    levels: tuple[int, ...] | None = None  # fsq: FSQ levels; null: the init tokenizer's
    bottleneck_dim: int | None = None  # proximal: bottleneck width; null: the init tokenizer's
    # proximal, fsq: where the head-wise blocks take patch positions from (viq.config.HeadConfig.position);
    # null: the init tokenizer's
    head_position: Literal["rope", "learnable", "none"] | None = None
    # proximal: give the 2-1 head the head-wise blocks too (2-2 then loads them); the reference's has none
    proximal_rope_blocks: bool = False
    area_range: tuple[int, int] | None = None  # sample each image's pixel area in [min, max] (log-uniform)
    # or a curriculum over the run (LLM stages): phases in order, each ending at a fraction of the optimizer
    # steps, e.g. 384^2 then 768^2 as the reference's stage 1 (mllm.data.phases)
    area_schedule: tuple[AreaPhase, ...] | None = None
    # what the head's reconstruction branch regresses (viq-paper.md §1.2, ablation (f)): vae_latent, the posterior
    # mean of the frozen Qwen-Image VAE encoder at stage.vae (MSE; its decoder shows the reconstructions);
    # pixels (MSE + the optional perceptual term); none (no reconstruction branch)
    recon_target: Literal["vae_latent", "pixels", "none"] = "pixels"
    vae: str | None = None  # recon_target=vae_latent: a Qwen-Image VAE directory in diffusers' format
    perceptual: str | None = None  # "file.py:name" or a TorchScript file: a frozen perceptual loss
    perceptual_weight: float = 1.0
    metrics_window: int = 50  # codebook usage and perplexity over the codes of the last K steps
    stability_every: int = 10  # code stability under noise every N steps (0: never)
    noise_sigma: float = 0.01  # in [-1, 1] pixel units
    calibrate: bool = True  # fsq: start project_in from the data (zero-mean, unit-std FSQ inputs)
    calibration_images: int = 64
    # start the LLM and projector from stage.init's (its llm/ model or adapter, its projector) instead of
    # model.llm and a fresh projector: a chain whose LLM is trained from scratch must not restart it
    llm_from_init: bool = False

    def __post_init__(self):
        if self.teacher_resolution <= 0:
            raise ConfigError(f"stage.teacher_resolution must be positive, got {self.teacher_resolution}")
        if self.pos_grid is not None and (self.kind != "stage1" or self.pos_grid <= 0):
            raise ConfigError(f"stage.pos_grid={self.pos_grid} applies to stage.kind=stage1 and must be positive "
                              f"(got kind={self.kind})")
        for name in ("distill_weight", "recon_weight", "feat_rec_weight", "perceptual_weight", "noise_sigma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stage.{name} must be >= 0, got {getattr(self, name)}")
        if self.metrics_window <= 0 or self.stability_every < 0:
            raise ConfigError(f"stage.metrics_window must be > 0 and stage.stability_every >= 0, got "
                              f"{self.metrics_window} and {self.stability_every}")
        _check_area_range("stage.area_range", self.area_range)
        self._check_area_schedule()
        if self.kind == "stage1" and (self.recon_weight or self.feat_rec_weight):
            raise ConfigError("stage.kind=stage1 has no head, so no reconstruction: set stage.recon_weight=0 "
                              f"and stage.feat_rec_weight=0 (got {self.recon_weight}, {self.feat_rec_weight})")
        if self.recon_target == "vae_latent" and self.kind != "stage1" and not self.vae:
            raise ConfigError("stage.recon_target=vae_latent needs stage.vae: a Qwen-Image VAE directory in "
                              "diffusers' format (the vae/ folder of Qwen/Qwen-Image)")
        if self.kind == "decoder" and self.recon_target != "pixels":
            raise ConfigError(f"stage.kind=decoder trains the RGB pixel decoder: stage.recon_target must be pixels, "
                              f"got {self.recon_target!r}")
        if self.perceptual and self.recon_target != "pixels":
            raise ConfigError(f"stage.perceptual={self.perceptual!r} compares pixels: it needs stage.recon_target="
                              f"pixels, got {self.recon_target!r}")
        if self.vae and self.recon_target != "vae_latent":
            raise ConfigError(f"stage.vae={self.vae!r} applies to stage.recon_target=vae_latent, not "
                              f"{self.recon_target!r}")
        if self.llm_from_init and (self.init is None or self.kind == "decoder"):
            raise ConfigError(f"stage.llm_from_init needs an LLM stage with stage.init set (got kind={self.kind}, "
                              f"init={self.init})")
        for name, kind in (("levels", "fsq"), ("bottleneck_dim", "proximal"), ("proximal_rope_blocks", "proximal")):
            if getattr(self, name) not in (None, False) and self.kind != kind:
                raise ConfigError(f"stage.{name} applies to stage.kind={kind}, not {self.kind}")
        if self.head_position is not None and self.kind not in ("proximal", "fsq"):
            raise ConfigError(f"stage.head_position applies to stage.kind=proximal or fsq, not {self.kind}")
        wanted = {"proximal": ("linf", "l2", "tanh", "none"), "fsq": ("fsq",)}.get(self.kind)
        if self.quantizer is not None and (wanted is None or self.quantizer not in wanted):
            raise ConfigError(f"stage.quantizer={self.quantizer!r} does not fit stage.kind={self.kind!r} "
                              f"(allowed: {list(wanted or ())})")

    def _check_area_schedule(self) -> None:
        phases = self.area_schedule
        if phases is None:
            return
        if self.area_range is not None:
            raise ConfigError(f"stage.area_range={list(self.area_range)} and stage.area_schedule both set the "
                              "image areas: keep one")
        if self.kind not in MLLM_STAGES:
            raise ConfigError(f"stage.area_schedule applies to the LLM stages {list(MLLM_STAGES)}, not "
                              f"{self.kind} (it draws a new area per step: use stage.area_range)")
        ends = [p.until for p in phases]
        if not ends or ends[-1] != 1.0 or ends != sorted(set(ends)):
            raise ConfigError(f"stage.area_schedule: the phases' until must increase and the last be 1.0 (the "
                              f"end of the run), got {ends}")


@dataclass(frozen=True)
class RecipeConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lr: LrConfig = field(default_factory=LrConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage: StageConfig | None = None  # null: ordinary MLLM training; set: a tokenizer stage (mllm.stages)

    def __post_init__(self):
        if self.model.visual == "discrete" and (self.trainable.tower or self.trainable.head):
            raise ConfigError("trainable.tower/head need model.visual=continuous (discrete: no tower)")
        if self.model.visual == "continuous" and self.trainable.embedder:
            raise ConfigError("trainable.embedder needs model.visual=discrete (a continuous run with "
                              "use_head trains the head's embedder as part of trainable.head)")
        if self.trainable.head and not self.model.use_head:
            raise ConfigError("trainable.head=true needs model.use_head=true")
        if self.data.codes and self.model.visual != "discrete":
            raise ConfigError(f"data.codes={self.data.codes!r} needs model.visual=discrete")
        if self.model.visual == "discrete" and self.model.siglip2:
            raise ConfigError(f"model.siglip2={self.model.siglip2!r} only applies to model.visual=continuous")
        if self.stage is not None:
            self._check_stage()
        self._check_tokenizer_init()

    def _check_tokenizer_init(self) -> None:
        stage_init = self.stage.init if self.stage is not None else None
        spec, key = (stage_init, "stage.init") if stage_init else (self.model.tokenizer, "model.tokenizer")
        if spec not in TOKENIZER_PRESETS or self.model.tokenizer_init == "random":
            return
        m = self.model
        if m.visual == "continuous" and m.siglip2 and not m.use_head and not stage_init:
            return  # the only weights used are the SigLIP2 tower's
        raise ConfigError(
            f"{key}={spec!r} is a ViQ architecture with random weights, not a trained tokenizer: name a ViQ "
            f"tokenizer directory (a tokenizer stage's output, or `viq convert-reference` of the authors' weights), "
            f"start the tower from model.siglip2=DIR, or say model.tokenizer_init: random in the recipe (tests, "
            f"benchmarks, debug runs)")

    def _check_stage(self) -> None:
        kind = self.stage.kind
        if kind not in MLLM_STAGES:
            return  # the decoder stage trains the pixel decoder alone; model.llm/visual are not used
        if self.model.visual != "continuous":
            raise ConfigError(f"stage.kind={kind} trains the tower on pixels: set model.visual=continuous")
        if self.model.use_head != (kind != "stage1"):
            raise ConfigError(f"stage.kind={kind} needs model.use_head={str(kind != 'stage1').lower()} "
                              "(stage1 trains the encoder alone, later stages the head)")
        if self.model.siglip2 and kind != "stage1":
            raise ConfigError(f"model.siglip2={self.model.siglip2!r} applies to stage1; later stages start "
                              "from stage.init")
        if self.stage.llm_from_init and self.train.calibrate_projector:
            raise ConfigError("train.calibrate_projector would overwrite the projector that stage.llm_from_init "
                              "continues: set one of them to false")

    def part_lr(self, part: str) -> float:
        lr = getattr(self.lr, part)
        return self.train.learning_rate if lr is None else lr


# the recipes ship inside the wheel as mllm/recipes; in a source checkout they are the top-level recipes/
PACKAGED_RECIPES = next((d for d in (Path(__file__).parent / "recipes", Path(__file__).parents[1] / "recipes")
                         if d.is_dir()), None)


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe file (or a DeepSpeed config): a path (relative to the current directory), else a packaged one
    named by its path under recipes/, with or without the ``recipes/`` prefix and the ``.yaml`` suffix
    (``debug/sft_full``, ``recipes/deepspeed/zero2.json``)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("recipes/")
    if PACKAGED_RECIPES is not None and not path.is_absolute():
        for candidate in (PACKAGED_RECIPES / name, PACKAGED_RECIPES / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"recipe {str(spec)!r} is neither a file nor a packaged recipe (under {PACKAGED_RECIPES})")


def load_recipe(path: str | Path | None, overrides=()) -> RecipeConfig:
    return load_config(RecipeConfig, resolve_recipe(path) if path is not None else None, overrides)


def save_recipe(cfg: RecipeConfig, path: str | Path) -> None:
    dump_yaml(cfg, path)


def resolve_dtype(name: str, cuda: bool | None = None) -> torch.dtype:
    """"auto": bf16 on CUDA, fp32 on CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    if name not in table:
        raise ValueError(f"model.dtype {name!r} is not one of auto, float32, bfloat16")
    return table[name]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(name: str, cuda: bool | None = None) -> str:
    """"auto": flash_attention_2 when flash-attn is installed and CUDA is there, else sdpa (which
    takes the packed-sequence mask transformers derives from position_ids)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return "flash_attention_2" if cuda and flash_attn_available() else "sdpa"
    if name == "flash_attention_2" and not flash_attn_available():
        raise ValueError("model.attn_implementation='flash_attention_2' but flash-attn is not installed")
    return name
