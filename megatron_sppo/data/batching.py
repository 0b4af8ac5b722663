"""Micro-batches formed by a token budget (dynamic batching), not by a fixed count.

A padded micro-batch costs (number of sequences) x (its longest sequence) tokens of
activation memory. Sorting by length and filling each micro-batch up to ``max_tokens`` keeps
long responses from running out of memory while short ones still fill the GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_sppo.errors import UserError


def token_budget_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of the sequences in each micro-batch; every index appears exactly once.

    Longest first: a micro-batch's padded size is len(micro-batch) x its first length.
    """
    if max_tokens <= 0:
        raise UserError(f"max_tokens_per_microbatch={max_tokens} must be > 0")
    longest = max(lengths, default=0)
    if longest > max_tokens:
        raise UserError(f"a sequence of {longest} tokens exceeds max_tokens_per_microbatch="
                        f"{max_tokens}: raise it to at least prompt + response length")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def select_rows(batch, rows: list[int], lengths: torch.Tensor, multiple: int = 1):
    """The rows of a dataclass of [B], [B, S] and [B, S-1] tensors (None fields stay None),
    trimmed to the longest of those rows (``lengths``: [B] real sequence lengths), then
    right-padded with zeros to a width that is a multiple of ``multiple`` (FP8 GEMMs and
    sequence parallelism need aligned sequence lengths; padding sits after every real token
    and outside every mask, so causal attention leaves real positions unchanged)."""
    idx = torch.tensor(rows)
    values = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    full = max(t.shape[1] for t in values.values() if t is not None and t.dim() == 2)
    width = -(-int(lengths[idx].max()) // multiple) * multiple
    cut = full - width  # columns to drop (< 0: columns of padding to add)

    def take(t):
        if t is None or t.dim() == 1:
            return None if t is None else t[idx]
        t = t[idx, : t.shape[1] - max(cut, 0)]
        return torch.nn.functional.pad(t, (0, -cut)) if cut < 0 else t

    return dataclasses.replace(batch, **{name: take(t) for name, t in values.items()})


def to_device(batch, device: torch.device):
    """Tensors on ``device``, inside tuples, lists and dataclasses (anything else is kept):
    the one place micro-batches cross from the host, where rollouts are assembled, to the
    GPU."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(x, device) for x in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch)})
    return batch
