"""The critic's forward/backward inside megatron-core's schedule: SPPO's prompt-only critic
and, for the token-level PPO baseline, a critic over every response token.

The critic reads the prompt only: its logit at the last prompt token is f(prompt), and
V(prompt) = sigmoid(f) is the predicted probability that the policy solves it. Values are
computed with the pre-update critic (``forward_only``), then it learns with binary
cross-entropy on the 0/1 correctness, averaged over all prompts of the mini-batch across
micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sppo.algorithms import bce_value_loss, clipped_value_loss
from megatron_sppo.data.batching import select_rows, token_budget_microbatches
from megatron_sppo.data.packing import SequenceLayout
from megatron_sppo.models.critic import logits_at
from megatron_sppo.trainer.schedule import run_microbatches


@dataclass
class CriticBatch:
    """Right-padded prompts of this data-parallel rank, in the critic's own tokenization.

    prompt_ids: [B, P]; prompt_lengths: [B]; correctness: [B] 0/1 (None for values only).
    """

    prompt_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    correctness: torch.Tensor | None = None

    def micro(self, rows: list[int], align: int = 1) -> "CriticBatch":
        return select_rows(self, rows, self.prompt_lengths, align)


def critic_forward_backward(model, batch: CriticBatch, *, max_tokens: int,
                            forward_only: bool = False,
                            layout: SequenceLayout = SequenceLayout()) -> list[dict]:
    """Dicts with ``rows`` and their ``logits`` f(prompt) as this forward computed them;
    unless forward_only, the BCE update's gradients are also accumulated in the DDP buffers
    (call optimizer.step() after)."""
    groups = token_budget_microbatches(batch.prompt_lengths.tolist(), max_tokens)

    def loss(output, item):
        rows, mb = item
        logits = logits_at(output, mb.prompt_lengths - 1)
        values = {"rows": rows, "logits": logits.detach()}
        if forward_only:
            return logits.sum(), 1, values
        out = bce_value_loss(logits, mb.correctness)
        return out.loss_sum, out.denominator, values

    micro = [(rows, batch.micro(rows, layout.row_multiple)) for rows in groups]
    return run_microbatches(model, [(mb.prompt_ids, mb.prompt_lengths, (rows, mb))
                                    for rows, mb in micro], loss, forward_only, layout.pack_align)


def gather_critic_logits(results: list[dict], batch_size: int) -> torch.Tensor:
    """Forward-only results -> [B] critic logits in the batch's row order."""
    out = torch.zeros(batch_size)
    for r in results:
        out[torch.tensor(r["rows"])] = r["logits"]
    return out


@dataclass
class TokenCriticBatch:
    """Token-level PPO (gae): the critic reads prompt + response and predicts V(s_t) at every
    position; per-token tensors are aligned like the policy's ([B, S-1]: the value at
    position t is V of the state that predicts token t+1).

    input_ids: [B, S]; lengths: [B]; response_mask: [B, S-1];
    old_values, returns: [B, S-1] (None for values only).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    response_mask: torch.Tensor
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def micro(self, rows: list[int], align: int = 1) -> "TokenCriticBatch":
        return select_rows(self, rows, self.lengths, align)


def token_critic_forward_backward(model, batch: TokenCriticBatch, *, max_tokens: int,
                                  clip_range: float = 0.5,
                                  forward_only: bool = False,
                            layout: SequenceLayout = SequenceLayout()) -> list[dict]:
    """forward_only: dicts with ``rows`` and per-token ``values``; otherwise the clipped value
    loss (token-mean over the mini-batch) is back-propagated."""
    groups = token_budget_microbatches(batch.lengths.tolist(), max_tokens)

    def loss(output, item):
        rows, mb = item
        values = output[:, :-1, 0]
        if forward_only:
            return values.sum(), 1, {"rows": rows, "values": values.detach()}
        out = clipped_value_loss(values, mb.old_values, mb.returns, mb.response_mask, clip_range)
        return out.loss_sum, out.denominator, {}

    micro = [(rows, batch.micro(rows, layout.row_multiple)) for rows in groups]
    return run_microbatches(model, [(mb.input_ids, mb.lengths, (rows, mb))
                                    for rows, mb in micro], loss, forward_only, layout.pack_align)
