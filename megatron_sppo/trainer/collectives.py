"""Moving step data between ranks: every rank holds the whole rollout batch (token ids are
small next to activations), each data-parallel rank trains on its own rows, and per-row
results computed on the last pipeline stage (log-probs, critic logits, loss statistics) are
shared with every rank so that advantages and metrics are computed identically everywhere."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from global rank ``src`` on every rank (rollouts, rewards)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def data_parallel_rows(rows: list[int]) -> list[int]:
    """This data-parallel rank's share of ``rows`` (strided, so shares differ by at most 1)."""
    from megatron.core import parallel_state

    return rows[parallel_state.get_data_parallel_rank()::
                parallel_state.get_data_parallel_world_size()]


def is_contributor() -> bool:
    """One rank per data-parallel replica reports results: last pipeline stage, TP rank 0."""
    from megatron.core import parallel_state

    return (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def sum_over_replicas(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the contributing rank of every data-parallel replica, on all ranks.
    Non-contributors' values are ignored (their ``x`` only gives the shape)."""
    x = x.detach().to(torch.float64).clone()
    if not is_contributor():
        x.zero_()
    if dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def share_rows(results: list[dict], key: str, shape: tuple[int, ...]) -> torch.Tensor:
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
    return sum_over_replicas(out).to(torch.float32)


def sum_stats(results: list[dict], keys: list[str]) -> dict[str, float]:
    """Sum of scalar ``keys`` over micro-batches and replicas (loss sums, token counts)."""
    local = torch.tensor([sum(float(r[k]) for r in results) for k in keys])
    return dict(zip(keys, sum_over_replicas(local).tolist()))
