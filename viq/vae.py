"""The Qwen-Image VAE decoder: latents predicted by the released drawer -> pixels.

The authors' drawer (``index_drawer.pth``) carries a copy of the pretrained Qwen-Image VAE under
``vae_head.vae.*``. It is diffusers' ``AutoencoderKLQwenImage`` with its default configuration, so we use
diffusers' implementation (the optional extra ``viq[reference]``) rather than vendoring it. Only the
decoder half (``post_quant_conv.*``, ``decoder.*``) is loaded: the encoder half is never used at inference,
so it is removed from the module instead of being left with random weights.
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
# notes.external_vae of the design JSON: the Qwen/Qwen-Image vae config (diffusers' defaults)
DEFAULT_CONFIG: dict[str, Any] = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                  "attn_scales": [], "temperal_downsample": [False, True, True]}


def vae_available() -> bool:
    """Whether diffusers can be imported (checked without importing it: the import takes seconds)."""
    return importlib.util.find_spec("diffusers") is not None


def _vae_class():
    if not vae_available():
        raise ValueError(f"the Qwen-Image VAE decoder needs diffusers; {INSTALL_HINT}")
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage


class _Removed(nn.Module):
    """Stands in for the VAE's encoder half: holds no tensors, and fails loudly if anything calls it.

    diffusers' ``clear_cache`` counts the encoder's convolutions on every decode, so the attribute must
    stay a module (an empty one counts zero)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the Qwen-Image VAE's {self.name} is not loaded: ViQ only decodes latents")


def _check_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict both ways on the decoder half; the encoder half is allowed and reported, nothing else."""
    encoder = [k for k in state if k.startswith(ENCODER_PREFIXES)]
    missing = [f"{what}{k}" for k in own if k not in state]
    unexpected = [f"{what}{k}" for k in state if k not in own and not k.startswith(ENCODER_PREFIXES)]
    shapes = [f"{what}{k} {tuple(state[k].shape)}, needs {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"Qwen-Image VAE decoder: missing {missing[:20]}, unexpected {unexpected[:20]}, "
                         f"shape mismatches {shapes[:20]}")
    if encoder:
        log.info("%sencoder.*, %squant_conv.*: %d tensors of the VAE encoder, not loaded (unused at inference)",
                 what, what, len(encoder))


def load_qwen_image_vae_decoder(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                                *, dtype: torch.dtype = torch.float32, what: str = "") -> nn.Module:
    """An ``AutoencoderKLQwenImage`` holding only its decoder half, loaded strictly, in eval mode.

    ``state_dict`` uses diffusers' names (``decoder.conv_in.weight``, ...), as in ``vae_head.vae.*`` with
    the prefix stripped; ``what`` prefixes every name in errors (e.g. ``"index_drawer.pth: vae_head.vae."``).
    """
    cls = _vae_class()
    with torch.device("meta"):  # no random init: every tensor is overwritten below
        vae = cls.from_config({**DEFAULT_CONFIG, **(config or {})})  # drops keys of other diffusers versions
    vae.encoder, vae.quant_conv = _Removed("encoder"), _Removed("quant_conv")
    own = vae.state_dict()
    _check_keys(state_dict, own, what)
    # copies (never views of a memory-mapped file) in ``dtype``; assign replaces the meta tensors
    vae.load_state_dict({k: state_dict[k].to(dtype, copy=True) for k in own}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def save_vae(vae: nn.Module, path: str | Path) -> None:
    """diffusers' own format (config.json and safetensors weights), decoder half only."""
    vae.save_pretrained(str(path), safe_serialization=True)


def load_vae(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A ``save_vae`` directory -> the decoder, loaded strictly through ``load_qwen_image_vae_decoder``."""
    from safetensors.torch import load_file

    path = Path(path)
    config = dict(_vae_class().load_config(str(path)))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{path}: {WEIGHTS_FILE} is missing (not a saved Qwen-Image VAE decoder)")
    state = load_file(str(weights))
    dtype = dtype or next(iter(state.values())).dtype
    return load_qwen_image_vae_decoder(state, config, dtype=dtype, what=f"{weights}: ")


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
