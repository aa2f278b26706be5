"""What a training checkpoint and an exported MLLM directory hold, and how they load again.

Checkpoint (``train.output_dir/checkpoint-N`` and the final ``train.output_dir``)::

    mllm_config.yaml      the recipe that built the model (frozen parts rebuild from it, seeded)
    visual.safetensors    every trainable non-LLM weight (projector, embedder, tower, head), MLLM keys
    llm/                  peft adapters (LoRA/DoRA) or the full HF model (full fine-tuning), plus the
                          text tokenizer; a frozen LLM saves only the tokenizer

Export (``viq export``): LoRA merged into the base, everything self-describing::

    mllm_config.yaml      the recipe with model.llm -> llm, model.tokenizer -> viq_tokenizer (relative)
    llm/                  a plain HF model directory (config.json + safetensors + tokenizer)
    viq_tokenizer/        the ViQ tokenizer with the trained tower/head/embedder weights
    visual.safetensors    all projector and visual weights, MLLM keys
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.config import RecipeConfig, TrainableConfig, load_recipe, save_recipe
from mllm.model.build import BuiltModel, build_mllm
from mllm.model.layout import ADAPTER_WEIGHTS, LLM_DIR, MLLM_CONFIG, VIQ_DIR, VISUAL_WEIGHTS
from mllm.model.viq_loader import load_viq

log = logging.getLogger(__name__)

# MLLM visual keys -> ViQ tokenizer keys (the discrete embedder lives inside the tokenizer's head)
VISUAL_TO_VIQ = (("visual.encoder.", "encoder."), ("visual.head.", "head."),
                 ("visual.embedder.", "head.embedder."))


def is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(model: nn.Module, tokenizer, cfg: RecipeConfig, out_dir: str | Path,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint layout above. ``state_dict``: the (gathered, under ZeRO-3) MLLM state."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    visual = {k: v for k, v in state.items() if not k.startswith("llm.") and k in trainable}
    save_file(_cpu(visual), str(out / VISUAL_WEIGHTS), metadata={"format": "pt"})
    # a tied weight (lm_head = embed_tokens) is written once, under its first name, as save_pretrained does for a
    # live model; the state gathered by DeepSpeed holds a separate copy per name, which save_pretrained keeps
    aliases = ({n for n, _ in model.llm.named_parameters(remove_duplicate=False)}
               - {n for n, _ in model.llm.named_parameters()})
    llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    llm_state = {k: v for k, v in llm_state.items() if k not in aliases}
    if is_peft(model.llm):
        model.llm.save_pretrained(str(out / LLM_DIR), state_dict=llm_state)
    elif any(n.startswith("llm.") for n in trainable):
        model.llm.save_pretrained(str(out / LLM_DIR), state_dict=llm_state)
    tokenizer.save_pretrained(str(out / LLM_DIR))
    save_recipe(cfg, out / MLLM_CONFIG)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise ValueError(f"{path} holds no model.safetensors or model.safetensors.index.json")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def _load_llm_weights(llm: nn.Module, path: Path) -> None:
    if is_peft(llm):
        from peft import set_peft_model_state_dict

        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"{path} holds no {ADAPTER_WEIGHTS}, but the model has LoRA adapters")
        result = set_peft_model_state_dict(llm, load_file(str(path / ADAPTER_WEIGHTS)))
        if result.unexpected_keys:
            raise ValueError(f"unexpected adapter weights in {path}: {result.unexpected_keys[:8]}")
        return
    state = _read_hf_weights(path)
    missing, unexpected = llm.load_state_dict(state, strict=False)
    tied = set(getattr(llm, "all_tied_weights_keys", None) or {})  # saved once, under their source key
    if unexpected or set(missing) - tied:
        raise ValueError(f"cannot load the LLM from {path}: missing {sorted(set(missing) - tied)[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if missing:
        llm.tie_weights()


def load_checkpoint_weights(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Load what ``save_checkpoint`` wrote into a model built from the same recipe."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / VISUAL_WEIGHTS).is_file():
        raise ValueError(f"{ckpt} is not an MLLM checkpoint: {VISUAL_WEIGHTS} is missing")
    visual = load_file(str(ckpt / VISUAL_WEIGHTS))
    _, unexpected = model.load_state_dict(visual, strict=False)
    if unexpected:
        raise ValueError(f"unexpected weights in {ckpt / VISUAL_WEIGHTS}: {unexpected[:8]}")
    trains_llm = any(p.requires_grad for p in model.llm.parameters())
    if trains_llm or is_peft(model.llm):
        _load_llm_weights(model.llm, ckpt / LLM_DIR)
    log.info("loaded checkpoint weights from %s", ckpt)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Merge LoRA and write the self-describing export layout above; returns ``out_dir``."""
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    if not (ckpt / MLLM_CONFIG).is_file():
        raise ValueError(f"{ckpt} is not an MLLM checkpoint: {MLLM_CONFIG} is missing")
    cfg = load_recipe(ckpt / MLLM_CONFIG)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    built = build_mllm(cfg, cuda=False)
    model = built.model
    load_checkpoint_weights(model, ckpt)
    if is_peft(model.llm):
        model.llm = model.llm.merge_and_unload()
    model.llm.config.use_cache = True  # training switched the cache off; inference wants it
    out.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(str(out / LLM_DIR))
    built.tokenizer.save_pretrained(str(out / LLM_DIR))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    save_file(_cpu(state), str(out / VISUAL_WEIGHTS), metadata={"format": "pt"})
    _export_viq(cfg, state, out / VIQ_DIR)
    exported = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, llm=LLM_DIR, tokenizer=VIQ_DIR),
        trainable=dataclasses.replace(cfg.trainable, llm="full"),  # the merged LLM is a plain model
    )
    save_recipe(exported, out / MLLM_CONFIG)
    log.info("exported %s to %s", ckpt, out)
    return out


def _export_viq(cfg: RecipeConfig, visual_state: dict[str, torch.Tensor], out: Path) -> None:
    viq = load_viq(cfg.model.tokenizer, seed=cfg.train.seed, what="model.tokenizer")
    mapped = {}
    for key, value in visual_state.items():
        for src, dst in VISUAL_TO_VIQ:
            # a SigLIP2 tower has its own shape; it stays in visual.safetensors and model.siglip2
            if key.startswith(src) and not (cfg.model.siglip2 and src == "visual.encoder."):
                mapped[dst + key[len(src):]] = value
    _, unexpected = viq.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ValueError(f"visual weights that the ViQ tokenizer does not have: {unexpected[:8]}")
    viq.save_pretrained(out)


def load_exported(path: str | Path, *, cuda: bool | None = False) -> BuiltModel:
    """Rebuild an exported MLLM (all parts frozen, for inference) from its directory."""
    root = Path(path)
    cfg = load_recipe(root / MLLM_CONFIG)
    model_cfg = dataclasses.replace(cfg.model, llm=str(root / cfg.model.llm),
                                    tokenizer=str(root / cfg.model.tokenizer))
    cfg = dataclasses.replace(cfg, model=model_cfg, trainable=TrainableConfig(projector=False, llm="frozen"))
    built = build_mllm(cfg, cuda=cuda)
    state = load_file(str(root / VISUAL_WEIGHTS))
    missing, unexpected = built.model.load_state_dict(state, strict=False)
    missing_visual = [k for k in missing if not k.startswith("llm.")]
    if unexpected or missing_visual:
        raise ValueError(f"cannot load {root / VISUAL_WEIGHTS}: missing {missing_visual[:8]}, "
                         f"unexpected {unexpected[:8]}")
    built.model.eval()
    return built
