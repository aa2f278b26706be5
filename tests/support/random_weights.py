"""Random weights for tiny Hugging Face models built in the parity tests."""

from __future__ import annotations

import torch


def randomise(model):
    """Every parameter random (norm weights near one): HF initialises biases to zero and norms to one, and random
    values make every tensor count in a parity check."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model
