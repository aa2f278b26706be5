"""ViQTokenizer: images of any size -> discrete codes -> features or pixels.

Shape legend: ``N`` packed patches of a batch, ``E`` codes per patch, ``C`` width, ``cu`` int32 patch
offsets ``[B+1]``. ``Codes.indices`` is flat ``[h*w*E]`` in patch raster order, sub-code minor.
A tokenizer directory holds ``config.json`` (the full config tree) and ``model.safetensors``, and
``vae/`` (diffusers' format) when its decoder predicts latents of the Qwen-Image VAE (viq.vae).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from viq.config import TokenizerConfig, preset, tokenizer_config_from_dict
from viq.configio import to_dict
from viq.decoder import PixelDecoder
from viq.encoder import Encoder, cu_from_grids
from viq.head import HeadOutput, QuantizationHead
from viq.image import preprocess

FORMAT = "viq-tokenizer"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Codes:
    """The discrete representation of one image: ``indices`` (int64, ``[h*w*E]``) and its patch grid."""

    indices: torch.Tensor
    grid: tuple[int, int]

    def validate(self, codes_per_patch: int, codebook_size: int) -> None:
        h, w = self.grid
        expected = h * w * codes_per_patch
        if self.indices.ndim != 1 or self.indices.numel() != expected:
            raise ValueError(f"codes of shape {tuple(self.indices.shape)} do not match grid {self.grid} "
                             f"({expected} = {h}*{w}*{codes_per_patch} expected)")
        if self.indices.dtype.is_floating_point:
            raise ValueError(f"code indices must be integers, got {self.indices.dtype}")
        if expected and (int(self.indices.min()) < 0 or int(self.indices.max()) >= codebook_size):
            raise ValueError(f"code indices span [{int(self.indices.min())}, {int(self.indices.max())}], "
                             f"outside [0, {codebook_size})")


@dataclass
class TokenizerOutput:
    head: HeadOutput
    grids: list[tuple[int, int]]
    cu: torch.Tensor
    max_len: int
    trunk: torch.Tensor  # [N, C] encoder output before its final norm


class ViQTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        self.head = QuantizationHead(cfg.head)
        self.decoder = PixelDecoder(cfg.decoder) if cfg.decoder is not None else None
        self.vae = None  # the external, frozen VAE decoder of latent-predicting decoders (viq.vae)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``vae`` stays out of the registered modules: not in state_dict (it is saved apart, in diffusers'
        # format), not in parameters() (never trained), and it keeps its own dtype under .to(dtype)
        if name == "vae":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # construction and persistence
    @classmethod
    def from_preset(cls, name: str, seed: int | None = 0, **overrides) -> ViQTokenizer:
        """A preset with random weights (seeded, so two calls give the same model)."""
        cfg = preset(name, **overrides)
        if seed is None:
            return cls(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cfg)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": to_dict(self.cfg)}
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": FORMAT})
        if self.vae is not None:
            from viq.vae import save_vae

            save_vae(self.vae, path / "vae")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> ViQTokenizer:
        with skip_weight_init():  # every tensor is overwritten by the strict load below
            model = cls(read_config(path))
        state = load_file(str(Path(path) / "model.safetensors"))
        load_strict(model, state, what=str(path))
        if (Path(path) / "vae").is_dir():
            from viq.vae import load_vae, vae_available

            if vae_available():  # without diffusers everything but pixel decoding still works
                model.vae = load_vae(Path(path) / "vae", dtype or torch.float32).to(device)  # as the model
        return model.to(device=device, dtype=dtype) if (dtype or device) else model

    # forward passes
    @property
    def codes_per_patch(self) -> int:
        return self.cfg.head.expand

    @property
    def codebook_size(self) -> int:
        return self.head.embedder.codebook_size

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    def preprocess(self, images: list[Any]) -> list[torch.Tensor]:
        """PIL images, paths or uint8 arrays -> normalised [3, H, W] tensors; tensors pass through."""
        p = self.cfg.preprocess
        out = []
        for img in images:
            if isinstance(img, torch.Tensor):
                out.append(img)
            else:
                x, _ = preprocess(img, patch_size=self.cfg.encoder.patch_size, **dataclasses.asdict(p))
                out.append(x)
        return out

    def forward(self, pixels: list[torch.Tensor]) -> TokenizerOutput:
        """Normalised images -> head output for all of them in one packed forward."""
        if not pixels:
            raise ValueError("no images given")
        t = self.encoder.forward_pixels(pixels)
        return TokenizerOutput(self.head(t.trunk_ND, t.grids, t.cu, t.max_len), t.grids, t.cu, t.max_len, t.trunk_ND)

    @torch.inference_mode()
    def encode(self, images: list[Any] | Any) -> list[Codes]:
        """Images of any sizes -> one ``Codes`` per image (eval mode, one packed forward)."""
        if self.head.fsq is None:
            raise ValueError("this tokenizer has a proximal (continuous) head and yields no codes")
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = self.preprocess(list(images))
        was_training = self.training
        self.eval()
        try:
            t = self.encoder.forward_pixels(pixels)
            _, indices, _ = self.head.quantize(t.trunk_ND, t.grids, t.cu, t.max_len)
        finally:
            self.train(was_training)
        parts = indices.reshape(-1).split([h * w * self.codes_per_patch for h, w in t.grids])
        return [Codes(p.clone(), g) for p, g in zip(parts, t.grids, strict=True)]

    def embed(self, codes: Codes | list[Codes]) -> list[torch.Tensor]:
        """Codes -> per-patch features ``[h*w, C]`` per image (token-local, exact for any batching)."""
        codes = [codes] if isinstance(codes, Codes) else list(codes)
        for c in codes:
            c.validate(self.codes_per_patch, self.codebook_size)
        if not codes:
            return []
        flat = torch.cat([c.indices for c in codes]).to(self.device)
        feats = self.head.embedder(flat.reshape(-1, self.codes_per_patch))
        return list(feats.split([c.grid[0] * c.grid[1] for c in codes]))

    @torch.inference_mode()
    def decode(self, codes: Codes | list[Codes]) -> list[Image.Image]:
        """Codes -> RGB images of 16h x 16w pixels (through the VAE when the decoder predicts latents)."""
        if self.decoder is None:
            raise ValueError("this tokenizer has no pixel decoder (its config has decoder: null)")
        latent = self.cfg.decoder.out_channels != 3
        if latent and self.vae is None:
            raise ValueError(f"this tokenizer's decoder predicts {self.cfg.decoder.out_channels}-channel latents "
                             "of the Qwen-Image VAE, and pixels need that VAE's decoder: pip install "
                             '"viq[reference]" (diffusers), then load the weights with it: '
                             "viq.convert.load_reference(..., vae=True), or from_pretrained of a directory "
                             "that has vae/ (viq convert-reference writes it)")
        codes = [codes] if isinstance(codes, Codes) else list(codes)
        feats = self.embed(codes)
        grids = [c.grid for c in codes]
        cu, max_len = cu_from_grids(grids, self.device)
        outs = self.decoder(torch.cat(feats), grids, cu, max_len)
        if latent:
            from viq.vae import decode_latents

            vae = self.vae.to(self.device)
            return [Image.fromarray(decode_latents(vae, o)) for o in outs]
        return [to_pil(o) for o in outs]


# random initialisers a constructor calls; the Tensor methods catch the ones (trunc_normal_) that do not
# dispatch as themselves
_INITIALISERS = frozenset({
    torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_,
    torch.nn.init.xavier_normal_, torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.trunc_normal_,
    torch.nn.init.zeros_, torch.nn.init.ones_, torch.nn.init.constant_,
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
})


class _SkipInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Skip the random init of weights while building a model whose every persistent tensor a strict load
    overwrites next (about half the build time of the large presets). A torch function mode: it acts on
    this thread's calls inside the block only, and patches nothing."""
    with _SkipInit():
        yield


def to_pil(x_3HW: torch.Tensor) -> Image.Image:
    """[-1, 1] pixels -> uint8 RGB image (rounded, clamped)."""
    arr = ((x_3HW.float().clamp(-1, 1) * 0.5 + 0.5) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def read_config(path: str | Path) -> TokenizerConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a ViQ tokenizer directory: config.json is missing")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tokenizer_config_from_dict(meta["config"])


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load every parameter and buffer, refusing missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"cannot load {what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"shape mismatches {shapes[:8]}")
    model.load_state_dict(state, strict=True)
