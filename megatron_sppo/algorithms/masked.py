"""Masked reductions shared by estimators, losses and metrics.

Padding and prompt tokens are excluded with ``torch.where`` rather than a multiply, so a NaN or
inf sitting in a padded slot (e.g. a log-prob of a pad token) cannot leak into a sum or a
gradient. Masks are 0/1 (bool or float). An empty mask gives 0, not NaN: a micro-batch whose
responses were all dropped from the loss must contribute nothing, not poison the step.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x over entries where mask is 1 (all dims, or along ``dim``)."""
    return torch.where(mask.bool(), x, 0).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / max(sum(m), 1)."""
    return masked_sum(x, mask, dim) / mask.bool().sum(dim=dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries: sum((x - mean)^2) / (n - 1); 0 if n < 2."""
    n = mask.bool().sum()
    return masked_sum((x - masked_mean(x, mask)) ** 2, mask) / (n - 1).clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, 0 elsewhere."""
    white = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return torch.where(mask.bool(), white, 0)
