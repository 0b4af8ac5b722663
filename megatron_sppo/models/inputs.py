"""Model inputs megatron-core's GPTModel expects for a padded (bshd) batch."""

from __future__ import annotations

import torch


def causal_inputs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [b, s] and the boolean causal mask [1, 1, s, s] (True = masked out)."""
    b, s = ids.shape
    pos = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, -1)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool, device=ids.device).triu(1)
    return pos, mask
