"""Load SigLIP2 vision towers saved in Hugging Face format into ``viq.encoder.Encoder``.

Accepts a directory with ``config.json`` and safetensors of ``Siglip2VisionModel`` or ``Siglip2Model``
(the text tower is ignored). The checkpoint's own conventions are kept: tanh GELU, antialiased
bilinear resize of the position table, the final ``post_layernorm`` and the MAP head.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from viq.config import EncoderConfig
from viq.convert.keymap import apply_key_map
from viq.encoder import Encoder

log = logging.getLogger(__name__)

_TANH_GELUS = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_pytorch"}
_EXACT_GELUS = {"gelu"}

_RULES = [
    (r"embeddings\.patch_embedding\.bias", r"patch_embed.proj.bias"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"head\.probe", r"attn_pool.latent"),
    (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
    (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
    (r"head\.mlp\.(fc[12])\.(weight|bias)", r"attn_pool.mlp.\1.\2"),
]


def encoder_config_from_hf(cfg: dict) -> EncoderConfig:
    vc = cfg.get("vision_config", cfg) if cfg.get("model_type") == "siglip2" else cfg
    if vc.get("model_type") not in ("siglip2_vision_model", None):
        raise ValueError(f"not a SigLIP2 vision config: model_type {vc.get('model_type')!r}")
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _TANH_GELUS | _EXACT_GELUS:
        raise ValueError(f"unsupported SigLIP2 hidden_act {act!r}")
    num_patches = vc.get("num_patches", 256)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"num_patches {num_patches} is not a square position table")
    return EncoderConfig(
        width=vc.get("hidden_size", 768), depth=vc.get("num_hidden_layers", 12),
        num_heads=vc.get("num_attention_heads", 12), mlp_hidden=vc.get("intermediate_size", 3072),
        patch_size=vc.get("patch_size", 16), pos_grid=side, gelu="tanh" if act in _TANH_GELUS else "none",
        norm_eps=vc.get("layer_norm_eps", 1e-6), pos_antialias=True,
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _fuse_and_reshape(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """HF layout -> ours for the tensors a plain rename cannot express."""
    out = dict(state)
    p, d = cfg.patch_size, cfg.width
    w = out.pop("embeddings.patch_embedding.weight")
    # HF flattens patches as (p, p, C); our patch embedding is a conv kernel [D, C, p, p]
    out["patch_embed.proj.weight"] = w.reshape(d, p, p, 3).permute(0, 3, 1, 2).contiguous()
    out["pos_embed"] = out.pop("embeddings.position_embedding.weight").reshape(1, -1, d)
    for i in range(cfg.depth):
        pre = f"encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{pre}{n}_proj.{kind}") for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    if "head.attention.in_proj_weight" in out:
        wq, wkv = out.pop("head.attention.in_proj_weight").split([d, 2 * d])
        bq, bkv = out.pop("head.attention.in_proj_bias").split([d, 2 * d])
        out.update({"attn_pool.q.weight": wq, "attn_pool.q.bias": bq,
                    "attn_pool.kv.weight": wkv, "attn_pool.kv.bias": bkv})
    return out


def load_siglip2(path: str | Path, dtype: torch.dtype = torch.float32) -> Encoder:
    """A SigLIP2 checkpoint directory -> our Encoder, strictly (every tensor of ours filled)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory: config.json is missing")
    cfg = encoder_config_from_hf(json.loads(cfg_file.read_text()))
    state = {k.removeprefix("vision_model."): v for k, v in _read_state(path).items()
             if not k.startswith("text_model.") and k not in ("logit_scale", "logit_bias")}
    state = _fuse_and_reshape(state, cfg)
    encoder = Encoder(cfg)
    identity = [(re.escape(k), k) for k in ("patch_embed.proj.weight", "pos_embed")]
    identity.append((r"(blocks\.\d+\.attn\.qkv\.(weight|bias)|attn_pool\.(q|kv)\.(weight|bias))", r"\1"))
    has_head = "head.probe" in state
    report = apply_key_map(encoder, state, _RULES + identity, what=f"SigLIP2 checkpoint {path}",
                           allow_missing=() if has_head else (r"attn_pool\..*",))
    if report.reinitialised:
        log.warning("SigLIP2 checkpoint %s has no MAP head (vision_use_head=False): %d pooling tensors "
                    "keep their random init", path, len(report.reinitialised))
    return encoder.to(dtype)
