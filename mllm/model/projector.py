"""Vision-to-LLM projector: Linear -> learned 2x2 softmax pooling -> GELU -> Linear, with newline,
begin and end embeddings (viq-reference.md §4.2); the pooling can instead concatenate each window.

Shapes: ``x_NC`` the N = h*w patch features of one image (raster order), C the visual width;
``H`` the LLM hidden size. One image yields ``num_image_tokens(h, w)`` LLM tokens:
(h/2) rows of (w/2) pooled tokens, each row followed by a newline embedding, plus begin and end.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mllm.data.layout import num_image_tokens
from viq.layers import standardise_linear_


class SoftmaxPool2x2(nn.Module):
    """Per-channel softmax over each 2x2 window, scored from each vector and the window mean."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, win_W4H: torch.Tensor) -> torch.Tensor:
        """``[W, 4, H]`` windows -> ``[W, H]`` pooled vectors."""
        mean = win_W4H.mean(dim=1, keepdim=True).expand_as(win_W4H)
        scores = self.score(torch.cat([win_W4H, mean], dim=-1))
        # the softmax over the 4 window positions is numerically delicate under bf16: fp32 island
        weights = torch.softmax(scores.float(), dim=1).to(win_W4H.dtype)
        return (weights * win_W4H).sum(dim=1)


class ConcatPool2x2(nn.Module):
    """Each 2x2 window's four vectors side by side, then one Linear: keeps where in the window each patch
    was, which the softmax pool (symmetric in the four positions) drops; as Qwen2-VL's patch merger."""

    def __init__(self, hidden: int):
        super().__init__()
        self.merge = nn.Linear(4 * hidden, hidden)

    def forward(self, win_W4H: torch.Tensor) -> torch.Tensor:
        return self.merge(win_W4H.flatten(1))


POOLS = {"softmax": SoftmaxPool2x2, "concat": ConcatPool2x2}


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, pool: str = "softmax"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"projector pool {pool!r} is not one of {sorted(POOLS)}")
        self.proj1 = nn.Linear(in_dim, hidden)
        self.pool = POOLS[pool](hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        std = hidden**-0.5
        self.image_newline = nn.Parameter(torch.randn(hidden) * std)
        self.image_begin = nn.Parameter(torch.randn(hidden) * std)
        self.image_end = nn.Parameter(torch.randn(hidden) * std)

    @torch.no_grad()
    def calibrate(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Rescale ``proj1`` so that its outputs have zero mean and unit std per channel on these features.

        Visual features of mostly uniform images share a large common component (every background patch
        is alike), so a fresh ``proj1`` hands the LLM image tokens that differ by a few percent of their
        norm; this data-dependent start (as LSUV initialises a network) makes them differ from step one.
        Returns the per-channel std before.
        """
        return standardise_linear_(self.proj1, self.proj1(torch.cat(feats).to(self.proj1.weight)))

    def forward(self, feats_NC: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Packed features of the images (``[N, C]``, image after image) -> their packed LLM embeddings
        ``[sum of num_image_tokens(h, w), H]``; ``split_images`` cuts them per image.

        Every layer runs once over all images of the batch, and the output is one tensor whatever the image
        count: ZeRO-3 attaches its pre-backward parameter fetch to each output tensor of a module and records
        the module in its fetch trace once per tensor, so a list of per-image outputs made ranks with
        different image counts record different traces and fail at the next step.
        """
        sizes = [h * w for h, w in grids]
        if feats_NC.shape[0] != sum(sizes):
            raise ValueError(f"{feats_NC.shape[0]} features do not match the patch grids {grids} ({sum(sizes)})")
        windows = []
        for x_NC, (h, w) in zip(feats_NC.split(sizes), grids, strict=True):
            num_image_tokens(h, w)
            # [h*w, C] -> [(h/2)*(w/2), 4, C]: each 2x2 window's vectors, windows in raster order
            windows.append(x_NC.reshape(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(-1, 4, x_NC.shape[1]))
        pooled = self.proj2(F.gelu(self.pool(self.proj1(torch.cat(windows)))))
        out, start = [], 0
        for h, w in grids:
            n = (h // 2) * (w // 2)
            rows = pooled[start:start + n].reshape(h // 2, w // 2, -1)
            start += n
            rows = torch.cat([rows, self.image_newline.to(rows.dtype).expand(h // 2, 1, -1)], dim=1)
            out += [self.image_begin.to(rows.dtype)[None], rows.reshape(-1, rows.shape[-1]),
                    self.image_end.to(rows.dtype)[None]]
        return torch.cat(out)


def split_images(packed: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The per-image LLM embeddings of a ``Projector`` output."""
    return list(packed.split([num_image_tokens(h, w) for h, w in grids]))
