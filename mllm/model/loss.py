"""The causal-LM loss over the supervised positions only, in chunks, never holding the full ``[T, V]`` logits.

At 16K tokens Qwen2.5's 152k vocabulary makes about 9.7 GB of fp32 logits per sequence, plus their gradient:
often what stops a long-sequence run first. Here only the positions whose next token is supervised reach the
LM head, ``chunk_tokens`` at a time, and each chunk's logits are recomputed in the backward instead of kept.
The result equals transformers' ``ForCausalLMLoss`` (fp32 logits, labels shifted left, -100 ignored, a sum
over ``num_items_in_batch`` when the Trainer gives it, else the mean).

Shape legend: ``B`` rows, ``T`` positions, ``H`` hidden size, ``M`` supervised positions, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mllm.data.chat import IGNORE_INDEX

CHUNK_TOKENS = 1024  # 1024 x 152k fp32 logits: 0.6 GB at a time


def supervised_lm_loss(hidden_BTH: torch.Tensor, lm_head: nn.Module, labels_BT: torch.Tensor,
                       num_items_in_batch: torch.Tensor | int | None = None,
                       chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    target_BT = F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden_BTH.device)
    keep_BT = target_BT != IGNORE_INDEX
    hidden_MH, target_M = hidden_BTH[keep_BT], target_BT[keep_BT]

    def chunk_sum(h_MH: torch.Tensor, t_M: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h_MH).float(), t_M, reduction="sum")

    n = hidden_MH.shape[0]
    # every rank must call the LM head the same number of times: DDP needs its weight used on every rank, and
    # ZeRO-3 records the order of gathered modules and hangs when ranks differ. So at least one call (on no
    # rows when a rank has no supervised token), and one call in all under ZeRO-3 partitioning, where the
    # chunk count would follow each rank's own token count.
    step = max(n, 1) if hasattr(getattr(lm_head, "weight", None), "ds_id") else chunk_tokens
    total = hidden_BTH.new_zeros((), dtype=torch.float32)
    for lo in range(0, max(n, 1), step):
        h, t = hidden_MH[lo:lo + step], target_M[lo:lo + step]
        total = total + (checkpoint(chunk_sum, h, t, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_sum(h, t))
    if num_items_in_batch is None:
        return total / hidden_MH.shape[0]  # the mean; nan without a supervised position, as transformers
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
