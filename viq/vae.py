"""The Qwen-Image VAE: its decoder turns latents predicted by the drawer into pixels, its encoder gives the
latent reconstruction target of the tokenizer stages (viq-paper.md §1.2, L_R).

The authors' drawer (``index_drawer.pth``) carries a copy of the pretrained Qwen-Image VAE under
``vae_head.vae.*``. It is diffusers' ``AutoencoderKLQwenImage`` with its default configuration, so we use
diffusers' implementation (the optional extra ``viq[reference]``) rather than vendoring it. Each use loads
one half only: inference the decoder (``post_quant_conv.*``, ``decoder.*``), the training target the encoder
(``encoder.*``, ``quant_conv.*``); the other half is removed from the module instead of being left with
random weights.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

INSTALL_HINT = 'install diffusers with: pip install "viq[reference]"'
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # the name diffusers' save_pretrained writes
DECODER_PREFIXES = ("post_quant_conv.", "decoder.")
ENCODER_PREFIXES = ("quant_conv.", "encoder.")
SPATIAL_FACTOR = 8  # pixels per latent pixel along each side: three spatial down-samplings
LATENT_CHANNELS = 16  # z_dim of the Qwen-Image VAE
# notes.external_vae of the design JSON: the Qwen/Qwen-Image vae config (diffusers' defaults)
DEFAULT_CONFIG: dict[str, Any] = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                  "attn_scales": [], "temperal_downsample": [False, True, True]}


def vae_available() -> bool:
    """Whether diffusers can be imported (checked without importing it: the import takes seconds)."""
    return importlib.util.find_spec("diffusers") is not None


def _vae_class(what: str = "the Qwen-Image VAE decoder"):
    if not vae_available():
        raise ValueError(f"{what} needs diffusers; {INSTALL_HINT}")
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage


class _Removed(nn.Module):
    """Stands in for the half of the VAE that is not loaded: holds no tensors, and fails loudly if anything
    calls it.

    diffusers' ``clear_cache`` counts the encoder's and the decoder's convolutions on every encode and
    decode, so the attribute must stay a module (an empty one counts zero)."""

    def __init__(self, name: str, use: str):
        super().__init__()
        self.name, self.use = name, use

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the Qwen-Image VAE's {self.name} is not loaded: this copy only {self.use}")


def _check_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], what: str, half: str,
                other: tuple[str, ...]) -> None:
    """Strict both ways on one half; the other half (prefixes ``other``) is allowed and reported, nothing else."""
    skipped = [k for k in state if k.startswith(other)]
    missing = [f"{what}{k}" for k in own if k not in state]
    unexpected = [f"{what}{k}" for k in state if k not in own and not k.startswith(other)]
    shapes = [f"{what}{k} {tuple(state[k].shape)}, needs {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"Qwen-Image VAE {half}: missing {missing[:20]}, unexpected {unexpected[:20]}, "
                         f"shape mismatches {shapes[:20]}")
    if skipped:
        log.info("%s%s: %d tensors of the other half of the VAE, not loaded", what,
                 ", ".join(f"{p}*" for p in other), len(skipped))


def empty_vae_half(half: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """One half (``"encoder"`` or ``"decoder"``) of an ``AutoencoderKLQwenImage`` on the meta device: shapes
    only, no weights (the loaders fill it; dry runs count it)."""
    cls = _vae_class(f"the Qwen-Image VAE {half}")
    with torch.device("meta"):
        vae = cls.from_config({**DEFAULT_CONFIG, **(config or {})})  # drops keys of other diffusers versions
    if half == "decoder":
        vae.encoder, vae.quant_conv = _Removed("encoder", "decodes"), _Removed("quant_conv", "decodes")
    elif half == "encoder":
        vae.decoder, vae.post_quant_conv = _Removed("decoder", "encodes"), _Removed("post_quant_conv", "encodes")
    else:
        raise ValueError(f"half must be 'encoder' or 'decoder', got {half!r}")
    return vae


def _load_half(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, dtype: torch.dtype,
               what: str, half: str) -> nn.Module:
    vae = empty_vae_half(half, config)  # no random init: every tensor is overwritten below
    other = ENCODER_PREFIXES if half == "decoder" else DECODER_PREFIXES
    own = vae.state_dict()
    _check_keys(state_dict, own, what, half, other)
    # copies (never views of a memory-mapped file) in ``dtype``; assign replaces the meta tensors
    vae.load_state_dict({k: state_dict[k].to(dtype, copy=True) for k in own}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def load_qwen_image_vae_decoder(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                                *, dtype: torch.dtype = torch.float32, what: str = "") -> nn.Module:
    """An ``AutoencoderKLQwenImage`` holding only its decoder half, loaded strictly, in eval mode.

    ``state_dict`` uses diffusers' names (``decoder.conv_in.weight``, ...), as in ``vae_head.vae.*`` with
    the prefix stripped; ``what`` prefixes every name in errors (e.g. ``"index_drawer.pth: vae_head.vae."``).
    """
    return _load_half(state_dict, config, dtype, what, "decoder")


def load_qwen_image_vae_encoder(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                                *, dtype: torch.dtype = torch.float32, what: str = "") -> nn.Module:
    """An ``AutoencoderKLQwenImage`` holding only its encoder half (``encoder.*``, ``quant_conv.*``), loaded
    strictly, frozen, in eval mode: the producer of the latent reconstruction target (:func:`encode_latents`)."""
    return _load_half(state_dict, config, dtype, what, "encoder")


def save_vae(vae: nn.Module, path: str | Path) -> None:
    """diffusers' own format (config.json and safetensors weights), decoder half only."""
    vae.save_pretrained(str(path), safe_serialization=True)


def _read_vae_dir(path: str | Path, half: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    path = Path(path)
    cls = _vae_class(f"the Qwen-Image VAE {half}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: config.json is missing (not a Qwen-Image VAE directory in diffusers' format, "
                         "such as the vae/ folder of Qwen/Qwen-Image)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{path}: {WEIGHTS_FILE} is missing (not a saved Qwen-Image VAE)")
    return dict(cls.load_config(str(path))), load_file(str(weights)), weights


def load_vae(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A ``save_vae`` directory -> the decoder, loaded strictly through ``load_qwen_image_vae_decoder``."""
    config, state, weights = _read_vae_dir(path, "decoder")
    dtype = dtype or next(iter(state.values())).dtype
    return load_qwen_image_vae_decoder(state, config, dtype=dtype, what=f"{weights}: ")


def load_vae_halves(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """A complete Qwen-Image VAE directory (diffusers' format) -> (encoder half, decoder half), both frozen:
    the training target of ``recon_target: vae_latent`` and the decoder a tokenizer saves to show its
    reconstructions. The file is read once."""
    config, state, weights = _read_vae_dir(path, "encoder")
    what = f"{weights}: "
    encoder = load_qwen_image_vae_encoder(state, config, dtype=dtype, what=what)
    return encoder, load_qwen_image_vae_decoder(state, config, dtype=dtype, what=what)


@torch.no_grad()
def encode_latents(vae: nn.Module, image_3HW: torch.Tensor) -> torch.Tensor:
    """A normalised image ``[3, H, W]`` in [-1, 1] (sides multiples of 8) -> the posterior mean ``[z, H/8, W/8]``
    in fp32: the reference's reconstruction target (raw, without latents_mean/std normalisation), computed as
    diffusers' ``encode(x).latent_dist.mean`` of the image as a one-frame video ``[1, 3, T=1, H, W]``."""
    if image_3HW.ndim != 3 or image_3HW.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(image_3HW.shape)}")
    h, w = image_3HW.shape[1:]
    if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
        raise ValueError(f"image of size {h}x{w}: the VAE needs sides that are multiples of {SPATIAL_FACTOR}")
    param = next(vae.parameters())
    x = image_3HW.to(device=param.device, dtype=param.dtype)[None, :, None]
    return vae.encode(x).latent_dist.mean[0, :, 0].float()


@torch.inference_mode()
def decode_latents(vae: nn.Module, latent: torch.Tensor) -> np.ndarray:
    """Latents ``[16, h, w]`` (or ``[B, 16, h, w]``) -> uint8 pictures ``[8h, 8w, 3]`` (or ``[B, ...]``).

    Reproduces their ``QwenImageVAEHead.recon``: the latent is rounded to bf16 whatever the model dtype
    (their code casts it unconditionally), decoded as one frame (the VAE is a video VAE: ``[B, C, T=1, h,
    w]``), and ``(x * 0.5 + 0.5).clamp(0, 1) * 255`` is truncated (not rounded) to uint8 in numpy.
    """
    single = latent.ndim == 3
    z = latent[None] if single else latent
    z_dim = vae.config.z_dim
    if z.ndim != 4 or z.shape[1] != z_dim:
        raise ValueError(f"expected VAE latents of shape [{z_dim}, h, w] or [B, {z_dim}, h, w], "
                         f"got {tuple(latent.shape)}")
    param = next(vae.parameters())
    z = z.to(torch.bfloat16).to(device=param.device, dtype=param.dtype)
    image = vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]  # [B, 3, 8h, 8w] in [-1, 1]
    x = (image.permute(0, 2, 3, 1).float().cpu() * 0.5 + 0.5).clamp(0, 1).numpy()
    out = (x * 255).astype(np.uint8)
    return out[0] if single else out
