"""The policy's forward/backward inside megatron-core's schedules.

One call runs every micro-batch of a PPO mini-batch (formed by token budget) through
megatron-core's schedule (trainer/schedule.py: pipeline parallel, DDP, per-token loss
accounting), computing per-token log-probs and entropy from vocab-parallel logits and the
clipped PPO loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sppo.algorithms import PolicyLossConfig, policy_loss, policy_metrics
from megatron_sppo.data.batching import select_rows, token_budget_microbatches
from megatron_sppo.data.packing import SequenceLayout
from megatron_sppo.models.logprobs import token_logprobs_and_entropy
from megatron_sppo.trainer.schedule import run_microbatches


@dataclass
class PolicyBatch:
    """Right-padded sequences of this data-parallel rank; per-token tensors are aligned with
    the predicted tokens ``input_ids[:, 1:]`` (so they have S - 1 columns).

    input_ids: [B, S] prompt + response; lengths: [B] real length of each row;
    response_mask: [B, S-1] 1 where the predicted token is a trained response token;
    old_logprobs, advantages: [B, S-1]; rollout_logprobs/ref_logprobs optional [B, S-1].
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def micro(self, rows: list[int], align: int = 1) -> "PolicyBatch":
        return select_rows(self, rows, self.lengths, align)


def policy_forward_backward(model, batch: PolicyBatch, *, vocab_size: int, temperature: float,
                            max_tokens: int, loss_cfg: PolicyLossConfig | None = None,
                            forward_only: bool = False,
                            layout: SequenceLayout = SequenceLayout()) -> list[dict]:
    """Run the mini-batch; returns one dict per micro-batch (on the last pipeline stage).

    forward_only: no loss or gradients; each dict holds ``rows`` and their ``logprobs``
    (the old log-probs of the pre-update policy). Otherwise the dicts hold ``loss_sum``,
    ``denominator``, the response ``tokens`` and token-weighted sums of the policy metrics
    (clip fractions, approximate KL, entropy), and gradients are accumulated in the DDP buffers (call
    optimizer.step() afterwards). A batch without ``old_logprobs`` is the first update on
    fresh samples: the old log-probs are this forward's own, detached (the ratio is 1, its
    gradient that of the log-probs), and the dicts also hold ``rows`` and their ``logprobs``.
    """
    loss_cfg = loss_cfg or PolicyLossConfig()
    groups = token_budget_microbatches(batch.lengths.tolist(), max_tokens)

    def loss(output, item):
        rows, mb = item
        logprobs, entropy = token_logprobs_and_entropy(
            output[:, :-1], mb.input_ids[:, 1:], vocab_size=vocab_size,
            temperature=temperature, with_entropy=not forward_only,
            entropy_grad=loss_cfg.entropy_coef != 0)  # a metric only without the bonus
        if forward_only:
            return logprobs.sum(), 1, {"rows": rows, "logprobs": logprobs.detach()}
        fresh = mb.old_logprobs is None
        old = logprobs.detach() if fresh else mb.old_logprobs
        out = policy_loss(logprobs, old, mb.advantages, mb.response_mask, loss_cfg,
                          rollout_logprobs=mb.rollout_logprobs, ref_logprobs=mb.ref_logprobs,
                          entropy=entropy)
        tokens = mb.response_mask.sum()
        # token-weighted sums, so micro-batches and replicas combine into true means
        sums = {k: v * tokens if tokens > 0 else v.new_zeros(())
                for k, v in policy_metrics(out, mb.response_mask, entropy).items()}
        own = {"rows": rows, "logprobs": old} if fresh else {}
        return out.loss_sum, out.denominator, {"tokens": tokens, **sums, **own}

    micro = [(rows, batch.micro(rows, layout.row_multiple)) for rows in groups]
    return run_microbatches(model, [(mb.input_ids, mb.lengths, (rows, mb))
                                    for rows, mb in micro], loss, forward_only, layout.pack_align)


def gather_logprobs(results: list[dict], batch: PolicyBatch) -> torch.Tensor:
    """Forward-only results -> [B, S-1] log-probs in the batch's row order (0 past a row's end)."""
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    for r in results:
        for k, row in enumerate(r["rows"]):
            width = min(r["logprobs"].shape[1], out.shape[1])  # drop alignment padding
            out[row, :width] = r["logprobs"][k, :width]
    return out
