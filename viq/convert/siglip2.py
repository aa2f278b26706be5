"""Load SigLIP / SigLIP2 vision towers saved in Hugging Face format into ``viq.encoder.Encoder``.

Both published formats are read, told apart by the config's ``model_type``:

- fixed resolution (``siglip`` / ``siglip_vision_model``: ``SiglipModel``, ``SiglipVisionModel``; SigLIP2-g
  and the fixed-resolution so400m/base SigLIP2 checkpoints are published this way): a conv patch embedding
  of patch 14 or 16 and a square position table for ``image_size`` (224, 256 or 384 px). Away from that
  grid the table is resized bilinearly without antialias, as ViQ resizes it (viq-reference.md §1.3).
- NaFlex (``siglip2`` / ``siglip2_vision_model``: ``Siglip2Model``, ``Siglip2VisionModel``): a linear patch
  embedding on (p, p, C) patches and a square table resized bilinearly with antialias, as transformers does.

Text towers are ignored. The checkpoint's own tanh GELU, final ``post_layernorm`` and MAP head are kept.
``pos_grid=N`` resamples the table once to N x N (bicubic), as the reference does when it starts its
any-resolution tower from a raw SigLIP2 (24 -> 128), and then resizes it to every image as ViQ does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from viq.config import EncoderConfig
from viq.convert.keymap import apply_key_map
from viq.encoder import Encoder

log = logging.getLogger(__name__)

_TANH_GELUS = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_pytorch"}
_EXACT_GELUS = {"gelu"}
# model_type of a whole checkpoint (vision + text) or of its vision tower -> format
_FORMATS = {"siglip": "fixed", "siglip_vision_model": "fixed", "siglip2": "naflex", "siglip2_vision_model": "naflex"}
_TEXT_ONLY = {"siglip_text_model", "siglip2_text_model"}
POS_KEY = "embeddings.position_embedding.weight"
PATCH_KEY = "embeddings.patch_embedding.weight"

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


def checkpoint_format(cfg: dict, source: str = "config.json") -> tuple[str, dict]:
    """("fixed" | "naflex", the vision config) of a SigLIP config; ValueError naming ``source`` otherwise."""
    model_type = cfg.get("model_type")
    if model_type in _TEXT_ONLY:
        raise ValueError(f"{source}: model_type {model_type!r} is a text-only checkpoint; a vision tower is needed "
                         "(SiglipVisionModel, SiglipModel, Siglip2VisionModel or Siglip2Model)")
    if model_type not in _FORMATS:
        raise ValueError(f"{source}: model_type {model_type!r} is not a SigLIP checkpoint; supported: "
                         f"{sorted(_FORMATS)}")
    if model_type in ("siglip", "siglip2"):
        if not isinstance(cfg.get("vision_config"), dict):
            raise ValueError(f"{source}: model_type {model_type!r} has no vision_config")
        return _FORMATS[model_type], cfg["vision_config"]
    return _FORMATS[model_type], cfg


def encoder_config_from_hf(cfg: dict, source: str = "config.json") -> EncoderConfig:
    """Our encoder config from a SigLIP or SigLIP2 ``config.json`` (its native position grid)."""
    fmt, vc = checkpoint_format(cfg, source)
    field = "vision_config." if vc is not cfg else ""
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _TANH_GELUS | _EXACT_GELUS:
        raise ValueError(f"{source}: {field}hidden_act {act!r} is not supported "
                         f"({sorted(_TANH_GELUS | _EXACT_GELUS)})")
    if vc.get("num_channels", 3) != 3:
        raise ValueError(f"{source}: {field}num_channels {vc['num_channels']} is not 3 (RGB)")
    patch = vc.get("patch_size", 16)
    if fmt == "fixed":
        image_size = vc.get("image_size", 224)
        side = image_size // patch
        if side < 1:
            raise ValueError(f"{source}: {field}image_size {image_size} is smaller than patch_size {patch}")
    else:
        num_patches = vc.get("num_patches", 256)
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{source}: {field}num_patches {num_patches} is not a square position table")
    return EncoderConfig(
        width=vc.get("hidden_size", 768), depth=vc.get("num_hidden_layers", 12),
        num_heads=vc.get("num_attention_heads", 12), mlp_hidden=vc.get("intermediate_size", 3072),
        patch_size=patch, pos_grid=side, gelu="tanh" if act in _TANH_GELUS else "none",
        norm_eps=vc.get("layer_norm_eps", 1e-6), pos_antialias=fmt == "naflex",
    )


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The vision tower's tensors (prefix removed) and the file each came from."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
                continue
            key = key.removeprefix("vision_model.")
            state[key], origin[key] = value, str(f)
    return state, origin


def _fuse_and_reshape(state: dict[str, torch.Tensor], cfg: EncoderConfig, fmt: str) -> dict[str, torch.Tensor]:
    """HF layout -> ours for the tensors a plain rename cannot express."""
    out = dict(state)
    p, d = cfg.patch_size, cfg.width
    w = out.pop(PATCH_KEY)
    # NaFlex flattens patches as (p, p, C) for a Linear; the fixed-resolution tower is already a conv [D, C, p, p]
    out["patch_embed.proj.weight"] = w.reshape(d, p, p, 3).permute(0, 3, 1, 2).contiguous() if fmt == "naflex" else w
    out["pos_embed"] = out.pop(POS_KEY).reshape(1, -1, d)
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


def _check_position_table(path: Path, state: dict[str, torch.Tensor], origin: dict[str, str],
                          cfg: EncoderConfig) -> None:
    if POS_KEY not in state:
        raise ValueError(f"{path}: no safetensors file holds {POS_KEY}: not a SigLIP vision tower")
    rows = state[POS_KEY].shape[0]
    if rows != cfg.pos_grid ** 2:
        shape = "a square table" if math.isqrt(rows) ** 2 == rows else "not a square table"
        raise ValueError(f"{origin[POS_KEY]}: {POS_KEY} has {rows} rows ({shape}); config.json asks for the "
                         f"square {cfg.pos_grid}x{cfg.pos_grid} table")


def resample_position_table(encoder: Encoder, side: int) -> Encoder:
    """The encoder with its table resampled once to side x side (bicubic, align_corners=False, as the
    reference makes its 128 x 128 table from a SigLIP2 one) and resized to every image as ViQ does
    (bilinear, no antialias)."""
    cfg = encoder.cfg
    table = encoder.pos_embed.detach().reshape(1, cfg.pos_grid, cfg.pos_grid, cfg.width).permute(0, 3, 1, 2)
    if side != cfg.pos_grid:
        table = F.interpolate(table.float(), size=(side, side), mode="bicubic", align_corners=False)
    encoder.cfg = dataclasses.replace(cfg, pos_grid=side, pos_antialias=False)
    encoder.pos_embed = torch.nn.Parameter(table[0].flatten(1).t()[None].to(encoder.pos_embed.dtype).contiguous())
    return encoder


def load_siglip2(path: str | Path, dtype: torch.dtype = torch.float32, pos_grid: int | None = None) -> Encoder:
    """A SigLIP or SigLIP2 checkpoint directory -> our Encoder, strictly (every tensor of ours filled).

    ``pos_grid``: resample the position table once to this side (the reference's 128 for SigLIP2-g).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory: config.json is missing")
    if pos_grid is not None and pos_grid <= 0:
        raise ValueError(f"pos_grid must be positive, got {pos_grid}")
    raw = json.loads(cfg_file.read_text())
    fmt = checkpoint_format(raw, str(cfg_file))[0]
    cfg = encoder_config_from_hf(raw, str(cfg_file))
    state, origin = _read_state(path)
    _check_position_table(path, state, origin, cfg)
    state = _fuse_and_reshape(state, cfg, fmt)
    encoder = Encoder(cfg)
    identity = [(re.escape(k), k) for k in ("patch_embed.proj.weight", "pos_embed")]
    identity.append((r"(blocks\.\d+\.attn\.qkv\.(weight|bias)|attn_pool\.(q|kv)\.(weight|bias))", r"\1"))
    has_head = "head.probe" in state
    report = apply_key_map(encoder, state, _RULES + identity, what=f"SigLIP checkpoint {path}",
                           allow_missing=() if has_head else (r"attn_pool\..*",))
    if report.reinitialised:
        log.warning("SigLIP checkpoint %s has no MAP head (vision_use_head=False): %d pooling tensors "
                    "keep their random init", path, len(report.reinitialised))
    if pos_grid is not None:
        encoder = resample_position_table(encoder, pos_grid)
    return encoder.to(dtype)
