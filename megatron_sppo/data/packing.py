"""Packed (THD) micro-batches for Transformer Engine's attention.

A micro-batch of right-padded rows ``[b, s]`` becomes one row ``[1, T]``: each sequence's
real tokens at its own offset, each sequence padded to a multiple of ``align`` (FP8 GEMMs
need 16 tokens, MXFP8 32; sequence parallelism the TP size), so no compute is spent on
another row's padding. Attention stays within a sequence through the cumulative lengths
(``cu_seqlens``: real, ``cu_seqlens_padded``: with the per-sequence padding), which is what
megatron-core's ``PackedSeqParams(qkv_format="thd")`` hands to TE's fused attention and
rotary kernels. Outputs come back to the padded ``[b, s, ...]`` layout so the losses are the
same code on both paths.

Checked against megatron-core 0.19 ``packed_seq_params.py`` and the THD batches of Megatron-LM
(``get_batch_on_this_tp_rank`` with ``cu_seqlens``) and slime (``megatron_utils/data.py``).
The arithmetic is tested on CPU; the attention itself needs TE on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sppo.quant.fp8_train import pad_packed_lengths


@dataclass(frozen=True)
class SequenceLayout:
    """How a model's micro-batches reach it: right-padded rows whose width is a multiple of
    ``align``, or (``packed``) THD packs whose sequences are each padded to ``align``."""

    align: int = 1
    packed: bool = False

    @property
    def row_multiple(self) -> int:
        return 1 if self.packed else self.align

    @property
    def pack_align(self) -> int | None:
        return self.align if self.packed else None


@dataclass(frozen=True)
class PackPlan:
    """Where each sequence sits in the pack: ``lengths`` real, ``padded`` rounded up to the
    alignment, ``offsets`` the start of each (``offsets[-1]`` is the pack's length)."""

    lengths: tuple[int, ...]
    padded: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the padded layout of every real token, in pack order, and the
        positions in the pack they go to."""
        rows = torch.repeat_interleave(torch.arange(len(self.lengths)),
                                       torch.tensor(self.lengths))
        cols = torch.cat([torch.arange(n) for n in self.lengths]) if self.lengths else rows
        starts = torch.tensor(self.offsets[:-1])
        return torch.stack([rows, cols]), starts[rows] + cols


def plan_packing(lengths: list[int], align: int = 1) -> PackPlan:
    padded, offsets = pad_packed_lengths(list(lengths), align)
    return PackPlan(tuple(lengths), tuple(padded), tuple(offsets))


def pack(x: torch.Tensor, plan: PackPlan, pad_value=0) -> torch.Tensor:
    """``[b, s, ...]`` right-padded rows -> ``[1, T, ...]`` packed."""
    (rows, cols), at = plan.index()
    out = x.new_full((1, plan.total, *x.shape[2:]), pad_value)
    out[0, at] = x[rows, cols]
    return out


def unpack(y: torch.Tensor, plan: PackPlan, width: int) -> torch.Tensor:
    """``[1, T, ...]`` packed -> ``[b, width, ...]`` right-padded with zeros (differentiable)."""
    (rows, cols), at = plan.index()
    out = y.new_zeros((len(plan.lengths), width, *y.shape[2:]))
    return out.index_put((rows, cols), y[0, at])


def packed_seq_params(plan: PackPlan, device=None):
    """megatron-core's THD parameters for ``plan`` (int32 cumulative lengths)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    real = torch.tensor([0, *plan.lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    padded = torch.tensor(plan.offsets, dtype=torch.int32)
    longest = max(plan.padded)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real.to(device),
                           cu_seqlens_kv=real.to(device), cu_seqlens_q_padded=padded.to(device),
                           cu_seqlens_kv_padded=padded.to(device), max_seqlen_q=longest,
                           max_seqlen_kv=longest)
