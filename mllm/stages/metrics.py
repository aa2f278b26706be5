"""Metrics of the ViQ tokenizer stages: running means of the loss terms between two logs, codebook usage
and perplexity over the codes of the last K steps, code stability under small pixel noise, and PSNR.

Shape legend: ``N`` packed patches, ``E`` codes per patch. Pixels are normalised to [-1, 1], so the
PSNR's data range is 2 (as mllm.tools.evaluate.psnr).
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

PIXEL_RANGE = 2.0  # images are normalised to [-1, 1]


def psnr_from_mse(mse: float, data_range: float = PIXEL_RANGE) -> float:
    return 10 * math.log10(data_range**2 / mse) if mse > 0 else math.inf


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (distinct codes / codebook size) and histogram perplexity of a flat index tensor."""
    hist = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).double()
    p = hist[hist > 0] / hist.sum()
    return {"codebook_usage": int((hist > 0).sum()) / codebook_size,
            "code_perplexity": float(torch.exp(-(p * p.log()).sum()))}


def noisy_pixels(pixel_values: list[torch.Tensor], sigma: float, seed: int) -> list[torch.Tensor]:
    """The perturbation of code stability: N(0, sigma^2) noise on every pixel, clamped to [-1, 1]. It is
    drawn on the CPU with a seeded generator, so a measurement is reproducible on any device."""
    gen = torch.Generator().manual_seed(seed)
    return [(x.detach().float().cpu() + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            for x in pixel_values]


@torch.no_grad()
def code_stability(encoder: nn.Module, head: nn.Module, pixel_values: list[torch.Tensor],
                   indices_NE: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Fraction of codes unchanged under ``noisy_pixels``; costs one more tower forward without gradients."""
    t = encoder.forward_pixels(noisy_pixels(pixel_values, sigma, seed))
    _, noisy_NE, _ = head.quantize(t.trunk_ND, t.grids, t.cu, t.max_len)
    return (noisy_NE == indices_NE).float().mean()


class StageMetrics:
    """Sums of scalar metrics since the last ``pop`` (kept as tensors: no device sync per step), plus
    the code indices of the last ``window`` steps for the codebook usage."""

    def __init__(self, window: int, codebook_size: int | None, pixel_recon: bool = True):
        self.pixel_recon = pixel_recon  # recon_loss is a pixel MSE (a latent MSE has no PSNR)
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.codes: deque[torch.Tensor] = deque(maxlen=window)
        self.codebook_size = codebook_size

    def add(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def add_codes(self, indices: torch.Tensor) -> None:
        if self.codebook_size is not None:
            self.codes.append(indices.detach().reshape(-1))

    def pop(self) -> dict[str, float]:
        """Means since the last pop; ``recon_psnr`` from the mean MSE; codebook stats over the window."""
        out = {name: float(total) / self.counts[name] for name, total in self.sums.items()}
        if "recon_loss" in out and self.pixel_recon:
            out["recon_psnr"] = psnr_from_mse(out["recon_loss"])
        if "baseline_mse" in out:  # the decoder stage: what predicting each image's mean colour gives
            out["recon_psnr_mean_colour"] = psnr_from_mse(out.pop("baseline_mse"))
        if self.codes:
            out.update(codebook_stats(torch.cat(list(self.codes)), self.codebook_size))
        self.sums.clear()
        self.counts.clear()
        return out
