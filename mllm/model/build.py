"""Build an MLLM from a recipe: base LLM, ViQ visual input, projector; freezing, LoRA/DoRA, gradient
checkpointing, optimizer parameter groups, and the online code encoder of discrete runs.

Parts of an MLLM (names used by ``trainable`` and ``lr`` in the recipe, and by the optimizer groups):
``tower`` = ``visual.encoder`` (continuous), ``head`` = ``visual.head`` (continuous with use_head),
``embedder`` = ``visual.embedder`` (discrete), ``projector``, ``llm``.

Precision: trainable weights are kept in fp32 and the step runs under autocast (or DeepSpeed's bf16
with fp32 master weights); frozen parts are stored in the compute dtype to save memory.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mllm.config import RecipeConfig, resolve_attention, resolve_dtype
from mllm.data.codes import tokenizer_identity
from mllm.model.llm import IMAGE_TOKEN, LORA_TARGETS, load_llm
from mllm.model.mllm import MLLM, VisualInput
from mllm.model.viq_loader import load_viq
from viq.tokenizer import ViQTokenizer

log = logging.getLogger(__name__)

PEFT_AVAILABLE = importlib.util.find_spec("peft") is not None
# submodules of a part that the MLLM's forward never runs: the tower's MAP pooling head serves the
# tokenizer's contrastive objective only. Left trainable they get no gradient, which DDP rejects.
UNUSED_IN_MLLM = {"tower": ("attn_pool",)}
PART_PREFIXES = {"tower": "visual.encoder.", "head": "visual.head.", "embedder": "visual.embedder.",
                 "projector": "projector.", "llm": "llm.", "decoder": "decoder."}  # decoder: mllm.stages


@dataclass
class BuiltModel:
    model: MLLM
    tokenizer: PreTrainedTokenizerBase  # the LLM's text tokenizer (with the <image> token)
    code_encoder: CodeEncoder | None  # discrete runs: pixels -> codes when the batch brings no codes
    compute_dtype: torch.dtype
    # identity of the ViQ tokenizer as loaded (before any cast): checked against stored codes (data.codes)
    viq_identity: dict | None = None


class CodeEncoder(nn.Module):
    """Frozen ViQ encoder + quantization head (without its embedder): pixels -> flat code indices.

    A discrete run trains on codes; when the data set yields pixels (no offline extraction), the codes
    are computed inside the step with this module, always in eval mode and without gradients.
    """

    def __init__(self, tokenizer: ViQTokenizer):
        super().__init__()
        if tokenizer.head.fsq is None:
            raise ValueError(f"ViQ tokenizer {tokenizer.cfg.name!r} has a proximal head and yields no codes")
        self.encoder = tokenizer.encoder
        # the head's quantization path without its embedder: the embedder belongs to the MLLM (it may train,
        # in fp32), so it must not follow this module's device, dtype or requires_grad changes. The head
        # itself is held unregistered; its other children are registered here, the same module objects.
        self.quantizer_parts = nn.ModuleDict({n: m for n, m in tokenizer.head.named_children() if n != "embedder"})
        object.__setattr__(self, "head", tokenizer.head)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CodeEncoder:
        return super().train(False)  # codes are defined by the eval-mode tokenizer

    @torch.no_grad()
    def forward(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        t = self.encoder.forward_pixels(pixel_values)
        _, indices, _ = self.head.quantize(t.trunk_ND, t.grids, t.cu, t.max_len)
        return indices.reshape(-1)


def build_visual(cfg: RecipeConfig, tokenizer: ViQTokenizer) -> tuple[VisualInput, CodeEncoder | None]:
    m = cfg.model
    if m.visual == "discrete":
        visual = VisualInput(tokenizer, "discrete")
        return visual, CodeEncoder(tokenizer)
    if m.siglip2:
        from viq.convert import load_siglip2

        enc = load_siglip2(m.siglip2)
        if m.use_head and enc.cfg.width != tokenizer.cfg.encoder.width:
            raise ValueError(f"SigLIP2 width {enc.cfg.width} from {m.siglip2!r} does not match the ViQ head "
                             f"width {tokenizer.cfg.encoder.width} (model.use_head=true)")
        return VisualInput(tokenizer, "continuous", use_head=m.use_head, encoder=enc), None
    return VisualInput(tokenizer, "continuous", use_head=m.use_head), None


def model_parts(model: MLLM) -> dict[str, nn.Module | None]:
    visual = model.visual
    return {"tower": getattr(visual, "encoder", None), "head": getattr(visual, "head", None),
            "embedder": getattr(visual, "embedder", None), "projector": model.projector, "llm": model.llm}


def part_of(name: str) -> str:
    """The part a parameter name of an MLLM belongs to."""
    for part, prefix in PART_PREFIXES.items():
        if name.startswith(prefix):
            return part
    raise ValueError(f"parameter {name!r} belongs to no MLLM part ({', '.join(PART_PREFIXES.values())})")


def add_lora(llm: nn.Module, cfg: RecipeConfig) -> nn.Module:
    if not PEFT_AVAILABLE:
        raise ValueError("trainable.llm=lora needs peft: pip install 'viq[train]'")
    from peft import LoraConfig, get_peft_model

    family = llm.config.model_type
    targets = cfg.lora.targets or LORA_TARGETS.get(family)
    if not targets:
        raise ValueError(f"no default LoRA targets for LLM family {family!r}; set lora.targets "
                         f"(known families: {sorted(LORA_TARGETS)})")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      use_dora=cfg.lora.dora, target_modules=list(targets), task_type="CAUSAL_LM")
    # the adapters' random A matrices are part of the recipe: drawn from the global generator they made
    # two runs of one seeded recipe differ from step 2 on (B starts at zero, so step 1 hid it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return get_peft_model(llm, lora)


def apply_trainable(model: MLLM, cfg: RecipeConfig) -> None:
    """Freeze everything, then unfreeze the parts the recipe trains (LoRA is added by build_mllm)."""
    model.requires_grad_(False)
    parts = model_parts(model)
    for part in ("tower", "head", "embedder", "projector"):
        if getattr(cfg.trainable, part):
            if parts[part] is None:
                raise ValueError(f"trainable.{part}=true but this model (visual={cfg.model.visual}, "
                                 f"use_head={cfg.model.use_head}) has no {part}")
            parts[part].requires_grad_(True)
            for sub in UNUSED_IN_MLLM.get(part, ()):
                getattr(parts[part], sub).requires_grad_(False)
    if cfg.trainable.llm == "full":
        model.llm.requires_grad_(True)


def cast_frozen(model: MLLM, dtype: torch.dtype) -> None:
    """Store fully frozen visual parts and projector in the compute dtype (trainable ones stay fp32)."""
    for part, module in model_parts(model).items():
        if part == "llm" or module is None:
            continue
        if not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)


def enable_gradient_checkpointing(model: MLLM) -> None:
    # non-reentrant checkpointing works with frozen inputs (LoRA, frozen embeddings) without the
    # enable_input_require_grads hook that the reentrant variant needs
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    if hasattr(llm, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for name in ("encoder", "head"):
        module = getattr(model.visual, name, None)
        if module is not None:
            module.grad_checkpointing = True


def build_mllm(cfg: RecipeConfig, *, cuda: bool | None = None) -> BuiltModel:
    """The MLLM of a recipe, frozen and wrapped as the recipe says, seeded by ``train.seed``."""
    dtype = resolve_dtype(cfg.model.dtype, cuda)
    attn = resolve_attention(cfg.model.attn_implementation, cuda)
    # a fully trained LLM keeps fp32 master weights; a LoRA or frozen base is stored in the compute dtype
    llm_dtype = torch.float32 if cfg.trainable.llm == "full" else dtype
    llm, text_tok = load_llm(cfg.model.llm, init=cfg.model.llm_init, dtype=llm_dtype, attn_implementation=attn,
                              seed=cfg.train.seed)
    llm.config.use_cache = False
    viq_tok = load_viq(cfg.model.tokenizer, seed=cfg.train.seed, what="model.tokenizer")
    identity = tokenizer_identity(viq_tok) if cfg.data.codes else None
    visual, code_encoder = build_visual(cfg, viq_tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the projector's initialisation is part of the recipe
        model = MLLM(llm, visual, text_tok.convert_tokens_to_ids(IMAGE_TOKEN), pool=cfg.model.projector_pool)
    apply_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.trainable.llm == "lora":
        model.llm = add_lora(model.llm, cfg)
    cast_frozen(model, dtype)
    if code_encoder is not None:
        code_encoder.to(dtype)
    # under ZeRO-3 the LLM is built partitioned: numel() is this rank's share, ds_numel the whole
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info("built MLLM (llm=%s, visual=%s, attention=%s, dtype=%s): %.2fM of %.2fM parameters trainable",
             cfg.model.llm, cfg.model.visual, attn, dtype, n_train / 1e6, n_all / 1e6)
    return BuiltModel(model, text_tok, code_encoder, dtype, identity)
