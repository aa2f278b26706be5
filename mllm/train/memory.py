"""Per-GPU memory of a recipe under each ZeRO stage and offload (``viq plan``), from the parameter counts of its
model built on the meta device (shapes only: no weights read, no memory taken).

The accounting is the ZeRO paper's (Rajbhandari et al., 2020) for mixed precision under DeepSpeed: every weight
in the compute dtype (2 bytes in bf16), the gradients of the trainable ones in the compute dtype, and Adam's fp32
master copy, first and second moments (12 bytes per trainable parameter). ZeRO-1 splits the optimizer state over
the ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights, which each layer then gathers while it runs.
Optimizer offload moves the optimizer state and the gradient partitions to host memory, parameter offload the
weight partitions. Without DeepSpeed (DDP) the trainer keeps trainable weights in fp32 and frozen ones in the
compute dtype, with fp32 gradients and moments, all replicated.

Activations are the LLM's, counted per token and decoder layer from the tensors autograd keeps for the backward
(attention by a fused kernel, which stores no score matrix), for one micro-batch of
``train.per_device_batch_size`` rows of ``data.max_seq_len`` tokens; with gradient checkpointing only each layer's
input is kept, and one layer at a time is recomputed. The loss holds one chunk of logits at a time
(mllm.model.loss). Not counted: the visual tower's activations, allocator fragmentation, communication buckets
and the CUDA context (about 0.5-1 GiB): leave 10-20 % of the GPU free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mllm.config import RecipeConfig, resolve_dtype
from mllm.model.build import add_lora, apply_trainable, build_visual
from mllm.model.llm import LLM_PRESETS, from_pretrained, llm_source, preset_config
from mllm.model.loss import CHUNK_TOKENS
from mllm.model.mllm import MLLM
from mllm.model.viq_loader import viq_dir
from mllm.train.zero import load_zero_config
from viq.config import PRESETS, preset
from viq.tokenizer import ViQTokenizer, read_config

GiB = 2**30
ADAM_STATE_BYTES = 12  # fp32 master weight, first and second moment


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter of the MLLM (LLM with its LoRA adapters, visual input, projector)
    trainable: int
    largest_module: int  # the most parameters one module holds itself: what ZeRO-3 gathers at a time
    code_encoder: int  # the frozen encoder that turns pixels into codes in the step (outside DeepSpeed; 0 if none)
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    name: str
    stage: int  # 0: no DeepSpeed (DDP)
    offload_optimizer: bool = False
    offload_param: bool = False


SETUPS = (Setup("DDP (no ZeRO)", 0), Setup("ZeRO-1", 1), Setup("ZeRO-2", 2), Setup("ZeRO-3", 3),
          Setup("ZeRO-3 + optimizer offload", 3, True),
          Setup("ZeRO-3 + optimizer and parameter offload", 3, True, True))


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank."""

    setup: Setup
    params: float
    grads: float
    optimizer: float
    gathered: float  # ZeRO-3's gathered working set: the running module's weights and the prefetched next one's
    activations: float
    activations_checkpointed: float
    code_encoder: float
    host: float  # offloaded state in host memory, per rank

    def gpu(self, checkpointing: bool) -> float:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.params + self.grads + self.optimizer + self.gathered + act + self.code_encoder


def _tokenizer_config(spec: str):
    if spec in PRESETS:
        return preset(spec)
    try:
        return read_config(viq_dir(spec, "model.tokenizer"))
    except ValueError as err:
        raise ValueError(f"{err}. The estimate needs only its shape: name the preset it has, e.g. model.tokenizer="
                         f"so400m model.tokenizer_init=random (presets: {', '.join(PRESETS)})") from None


def _llm_config(spec: str):
    if spec in LLM_PRESETS:
        return preset_config(spec)
    return from_pretrained(AutoConfig, llm_source(spec))


def meta_model(cfg: RecipeConfig) -> tuple[MLLM, nn.Module | None]:
    """The recipe's MLLM (trainable parts and LoRA as the run sets them) and code encoder, on the meta device."""
    llm_config = _llm_config(cfg.model.llm)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config)
        visual, code_encoder = build_visual(cfg, ViQTokenizer(_tokenizer_config(cfg.model.tokenizer)))
        model = MLLM(llm, visual, image_token_id=0, pool=cfg.model.projector_pool)
        apply_trainable(model, cfg)
        if cfg.trainable.llm == "lora":
            model.llm = add_lora(model.llm, cfg)
    return model, (code_encoder if not cfg.data.codes else None)


def count_parameters(cfg: RecipeConfig) -> ParameterCounts:
    model, code_encoder = meta_model(cfg)
    c = model.llm.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    own = {id(p) for p in model.parameters()}
    return ParameterCounts(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        code_encoder=0 if code_encoder is None else sum(p.numel() for p in code_encoder.parameters()
                                                        if id(p) not in own),
        layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
        kv_dim=c.num_key_value_heads * head_dim,
        vocab=c.vocab_size,
    )


def activation_bytes(cfg: RecipeConfig, n: ParameterCounts, width: int) -> tuple[float, float]:
    """(without, with gradient checkpointing) for one micro-batch, ``width`` bytes per element."""
    tokens = cfg.train.per_device_batch_size * cfg.data.max_seq_len
    h, i, kv = n.hidden, n.intermediate, n.kv_dim
    # per token and layer: the two norms' inputs and outputs with their fp32 statistics (about 6h), the rotated
    # q, k, v and the attention output (2h + 2kv), the MLP's gate, activation, up and product (4i)
    per_layer = 8 * h + 2 * kv + 4 * i
    if cfg.trainable.llm == "lora" and cfg.lora.dropout > 0:
        per_layer += 6 * h + i  # each adapter keeps its own dropped-out copy of its input
    loss = 2 * min(tokens, CHUNK_TOKENS) * n.vocab * 4  # one chunk's fp32 logits and their gradient
    full = n.layers * tokens * per_layer * width + loss
    checkpointed = n.layers * tokens * h * width + tokens * per_layer * width + loss
    return full, checkpointed


def estimate(cfg: RecipeConfig, counts: ParameterCounts, setup: Setup, world_size: int) -> Estimate:
    if world_size <= 0:
        raise ValueError(f"world size must be positive, got {world_size}")
    width = torch.finfo(resolve_dtype(cfg.model.dtype, cuda=True)).bits // 8
    p, t, n = counts.total, counts.trainable, world_size
    act, act_gc = activation_bytes(cfg, counts, width)
    encoder = counts.code_encoder * width
    if setup.stage == 0:
        return Estimate(setup, params=4 * t + width * (p - t), grads=4 * t, optimizer=8 * t, gathered=0,
                        activations=act, activations_checkpointed=act_gc, code_encoder=encoder, host=0)
    params = width * p / (n if setup.stage == 3 else 1)
    grads = width * t / (n if setup.stage >= 2 else 1)
    optimizer = ADAM_STATE_BYTES * t / n
    host = 0.0
    if setup.offload_optimizer:
        host += optimizer + 4 * t / n  # the state and the fp32 gradient partitions
        optimizer, grads = 0.0, 0.0
    if setup.offload_param:
        host += params
        params = 0.0
    gathered = 2 * width * counts.largest_module if setup.stage == 3 else 0.0
    return Estimate(setup, params=params, grads=grads, optimizer=optimizer, gathered=gathered, activations=act,
                    activations_checkpointed=act_gc, code_encoder=encoder, host=host)


def recipe_setup(cfg: RecipeConfig, zero: dict | None) -> Setup:
    """The row of SETUPS the recipe runs with (``zero``: its DeepSpeed config, None without DeepSpeed)."""
    if zero is None:
        return SETUPS[0]
    z = zero.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    offload = {k: z.get(k, {}).get("device", "none") in ("cpu", "nvme") for k in ("offload_optimizer", "offload_param")}
    for setup in SETUPS:
        if (setup.stage, setup.offload_optimizer, setup.offload_param) == (stage, *offload.values()):
            return setup
    return dataclasses.replace(SETUPS[0], name=f"ZeRO-{stage}", stage=stage, **offload)


def report(cfg: RecipeConfig, counts: ParameterCounts, world_size: int, current: Setup) -> str:
    """The table ``viq plan`` prints: every setup, in GiB per GPU, the recipe's marked."""
    gc = cfg.train.gradient_checkpointing
    lines = [
        f"recipe: llm={cfg.model.llm} ({cfg.trainable.llm}), visual={cfg.model.visual}, "
        f"{cfg.train.per_device_batch_size} x {cfg.data.max_seq_len} tokens per micro-batch, "
        f"dtype={resolve_dtype(cfg.model.dtype, cuda=True)}, world size {world_size}",
        f"parameters: {counts.total / 1e9:.3f}B, trainable {counts.trainable / 1e9:.3f}B, largest module "
        f"{counts.largest_module / 1e6:.0f}M"
        + (f", code encoder (frozen, every rank) {counts.code_encoder / 1e6:.0f}M" if counts.code_encoder else ""),
        "GiB per GPU: weights + gradients + optimizer + ZeRO-3 gathered + activations (+ code encoder); "
        "host memory per rank for offload",
        f"{'':2}{'setup':42}{'weights':>9}{'grads':>9}{'optim':>9}{'gather':>9}{'act':>9}{'act(gc)':>9}"
        f"{'total':>9}{'total(gc)':>11}{'host':>9}",
    ]
    for setup in SETUPS if current in SETUPS else (*SETUPS, current):
        e = estimate(cfg, counts, setup, world_size)
        mark = "*" if setup == current else " "
        cells = (e.params, e.grads, e.optimizer, e.gathered, e.activations, e.activations_checkpointed)
        lines.append(f"{mark} {setup.name:42}" + "".join(f"{v / GiB:9.2f}" for v in cells)
                     + f"{e.gpu(False) / GiB:9.2f}{e.gpu(True) / GiB:11.2f}{e.host / GiB:9.2f}")
    lines.append(f"* the recipe's setup; it trains {'with' if gc else 'without'} gradient checkpointing "
                 f"(train.gradient_checkpointing={str(gc).lower()})")
    return "\n".join(lines)


def zero_config_of(cfg: RecipeConfig) -> dict | None:
    return load_zero_config(cfg.train.deepspeed)[1] if cfg.train.deepspeed else None


def plan(cfg: RecipeConfig, world_size: int) -> str:
    return report(cfg, count_parameters(cfg), world_size, recipe_setup(cfg, zero_config_of(cfg)))

