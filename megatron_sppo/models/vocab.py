"""Padded vocabulary rows must never be sampled or learned: their logits are set to -inf."""

from __future__ import annotations

import torch


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, tp_rank: int = 0) -> torch.Tensor:
    """Return ``logits`` [..., V/tp] with columns of ids >= ``vocab_size`` set to -inf.

    ``tp_rank`` locates this shard in the padded vocabulary (shard r holds ids
    [r*V/tp, (r+1)*V/tp)). Shards with no padded ids are returned unchanged (no copy).
    """
    width = logits.shape[-1]
    first_padded = vocab_size - tp_rank * width
    if first_padded >= width:
        return logits
    ids = torch.arange(width, device=logits.device)
    return logits.masked_fill(ids >= max(first_padded, 0), float("-inf"))
