"""Moving step data between ranks: every rank holds the whole rollout batch (token ids are
small next to activations), each data-parallel rank trains on its own rows, and per-row
results computed on the last pipeline stage (log-probs, critic logits, loss statistics) are
shared with every rank so that advantages and metrics are computed identically everywhere.
Each model splits rows and reports results by its own groups (policy and critic may differ).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_sppo.runtime.groups import ModelGroups


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from global rank ``src`` on every rank (rollouts, rewards)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def data_parallel_rows(rows: list[int], groups: ModelGroups) -> list[int]:
    """This data-parallel rank's share of ``rows`` (strided, so shares differ by at most 1)."""
    return rows[groups.dp_rank::groups.dp_size]


def is_contributor(groups: ModelGroups) -> bool:
    """One rank per data-parallel replica reports results: last pipeline stage, TP rank 0."""
    return groups.is_last_stage and groups.tp_rank == 0


def sum_over_replicas(x: torch.Tensor, groups: ModelGroups) -> torch.Tensor:
    """Sum of ``x`` over the contributing rank of every data-parallel replica of the model
    on ``groups``, on all ranks. Non-contributors' values are ignored (their ``x`` only gives
    the shape). A sum over the whole world, so it serves every model's layout."""
    x = x.detach().to(torch.float64).clone()
    if not is_contributor(groups):
        x.zero_()
    if dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def share_rows(results: list[dict], key: str, shape: tuple[int, ...],
               groups: ModelGroups) -> torch.Tensor:
    """Forward-only results (dicts with ``rows`` and per-row ``key`` tensors, rows indexing
    the global batch) of every replica -> the full [B, ...] tensor on every rank."""
    out = torch.zeros(shape, dtype=torch.float64)
    for r in results:
        values = r[key].to(torch.float64)
        for k, row in enumerate(r["rows"]):
            if values.dim() == 1:
                out[row] = values[k]
            else:  # micro-batches are trimmed to their rows, or padded for alignment
                width = min(values.shape[1], shape[1])
                out[row, :width] = values[k, :width]
    return sum_over_replicas(out, groups).to(torch.float32)


def sum_stats(results: list[dict], keys: list[str], groups: ModelGroups) -> dict[str, float]:
    """Sum of scalar ``keys`` over micro-batches and replicas (loss sums, token counts)."""
    local = torch.tensor([sum(float(r[k]) for r in results) for k in keys])
    return dict(zip(keys, sum_over_replicas(local, groups).tolist()))
