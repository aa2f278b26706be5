"""Frozen config dataclasses of the ViQ tokenizer and its presets.

Sizes follow viq-reference.md §1.1, §2.2 and §9. Every derived size (MLP widths, head dims) is a field
with its value set by the preset, so a saved ``config.json`` alone rebuilds the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from viq.configio import ConfigError, from_dict
from viq.quantize import fsq_levels


@dataclass(frozen=True)
class EncoderConfig:
    """Native-resolution ViT (SigLIP2-shaped) over packed patches, with a MAP pooling head."""

    width: int = 1536
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144
    patch_size: int = 16
    pos_grid: int = 128  # side of the learned position table, resized to every image's grid
    gelu: Literal["none", "tanh"] = "none"  # ViQ trains with exact GELU; SigLIP2 checkpoints use tanh
    norm_eps: float = 1e-6
    pos_antialias: bool = False  # ViQ resizes without antialias; transformers' Siglip2 with it

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ConfigError(f"encoder.width {self.width} is not divisible by num_heads {self.num_heads}")
        for name in ("width", "depth", "num_heads", "mlp_hidden", "patch_size", "pos_grid"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"encoder.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class HeadConfig:
    """Position-aware head-wise quantization head (viq-reference.md §2.2-2.4)."""

    width: int = 1536
    num_heads: int = 16  # heads of the pre-quantization ViT blocks
    mlp_hidden: int = 6144
    pre_blocks: int = 3
    expand: int = 4  # sub-tokens (codes) per patch, 1-D channel-group layout
    rope_blocks: int = 3
    rope_dim: int = 256  # attention width inside the head-wise RoPE blocks
    rope_mlp_hidden: int = 6144
    rope_angles: Literal["float32", "activation"] = "float32"  # "activation" matches released weights
    # where the head-wise blocks get the patch positions from (the paper's ablation (d)): the golden-angle 2-D
    # RoPE on q and k; a learned absolute table per sub-token, added before the blocks and resized to every
    # image's grid as the encoder's; or nowhere (then the head is permutation-equivariant over the patches)
    position: Literal["rope", "learnable", "none"] = "rope"
    position_grid: int = 16  # side of the learned table of position="learnable"
    # The reference's proximal stage (2-1) has no head-wise blocks: they belong to the FSQ head and start fresh
    # in 2-2. True builds them in every head (the variant this project trained before)
    proximal_rope_blocks: bool = False
    quantizer: Literal["fsq", "linf", "l2", "tanh", "none"] = "fsq"
    levels: tuple[int, ...] = (8, 8, 8, 6, 5)
    bottleneck_dim: int = 128  # width of the proximal (stage 2-1) bottleneck
    post_blocks: int = 3
    post_hidden: int = 3072
    norm_eps: float = 1e-6  # ViT / RoPE blocks
    aux_norm_eps: float = 1e-5  # the affine-free pre-norm and the residual-MLP norms

    def __post_init__(self):
        fsq_levels(self.levels)
        if self.width % self.num_heads:
            raise ConfigError(f"head.width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.rope_dim % 4:
            raise ConfigError(f"head.rope_dim must be a multiple of 4 (2-D RoPE halves), got {self.rope_dim}")
        if self.expand < 1:
            raise ConfigError(f"head.expand must be >= 1, got {self.expand}")
        if self.position_grid <= 0:
            raise ConfigError(f"head.position_grid must be positive, got {self.position_grid}")

    @property
    def headwise_blocks(self) -> int:
        """Head-wise blocks this head builds: ``rope_blocks`` for FSQ (or with proximal_rope_blocks), else 0."""
        return self.rope_blocks if self.quantizer == "fsq" or self.proximal_rope_blocks else 0

    @property
    def code_dim(self) -> int:
        return len(self.levels) if self.quantizer == "fsq" else self.bottleneck_dim


@dataclass(frozen=True)
class DecoderConfig:
    """Pixel decoder: adapter (MLP, LayerNorm, ViT blocks) -> GroupNorm/SiLU/conv -> pixel shuffle.

    With ``out_channels=3, upscale=16`` each patch becomes its 16x16 RGB pixels; with
    ``out_channels=16, upscale=2`` it predicts a 2x2 patch of an f8 VAE latent (the released drawer).
    """

    width: int = 1536
    blocks: int = 3
    num_heads: int = 16
    mlp_hidden: int = 6144
    out_channels: int = 3
    upscale: int = 16
    norm_groups: int = 32
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class PreprocessConfig:
    """How ``ViQTokenizer.encode`` turns an image into pixels (viq.image.preprocess)."""

    mode: Literal["resize", "none", "square_crop"] = "resize"
    area: int = 384 * 384
    multiple: int = 32
    min_area: int | None = None
    max_area: int | None = None


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = "custom"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    decoder: DecoderConfig | None = field(default_factory=DecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self):
        if self.head.width != self.encoder.width:
            raise ConfigError(f"head.width {self.head.width} != encoder.width {self.encoder.width}")
        if self.decoder is not None and self.decoder.width != self.head.width:
            raise ConfigError(f"decoder.width {self.decoder.width} != head.width {self.head.width}")


def _sized(width: int, depth: int, heads: int, mlp: int, levels: tuple[int, ...], **head_kw) -> TokenizerConfig:
    enc = EncoderConfig(width=width, depth=depth, num_heads=heads, mlp_hidden=mlp)
    head = HeadConfig(width=width, num_heads=heads, mlp_hidden=4 * width, rope_mlp_hidden=4 * width,
                      post_hidden=2 * width, levels=levels, **head_kw)
    dec = DecoderConfig(width=width, num_heads=heads, mlp_hidden=4 * width)
    return TokenizerConfig(encoder=enc, head=head, decoder=dec)


def _debug() -> TokenizerConfig:
    width = 64
    enc = EncoderConfig(width=width, depth=2, num_heads=4, mlp_hidden=256, pos_grid=16)
    head = HeadConfig(width=width, num_heads=4, mlp_hidden=256, pre_blocks=1, rope_blocks=1, rope_dim=32,
                      rope_mlp_hidden=256, levels=(8, 5, 5, 5), bottleneck_dim=16, post_blocks=1,
                      post_hidden=128)
    dec = DecoderConfig(width=width, blocks=1, num_heads=4, mlp_hidden=256, norm_groups=8)
    pre = PreprocessConfig(area=128 * 128)
    return TokenizerConfig(name="debug", encoder=enc, head=head, decoder=dec, preprocess=pre)


PRESETS = {
    "debug": _debug,
    "so400m": lambda: dataclasses.replace(_sized(1152, 27, 16, 4304, (8, 8, 8, 6, 5)), name="so400m"),
    "g": lambda: dataclasses.replace(_sized(1536, 40, 16, 6144, (8, 8, 8, 6, 5)), name="g"),
}


def preset(name: str, **overrides) -> TokenizerConfig:
    """Named preset, with top-level fields replaced by ``overrides`` (e.g. ``head=HeadConfig(...)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)


def tokenizer_config_from_dict(data: dict) -> TokenizerConfig:
    return from_dict(TokenizerConfig, data)
