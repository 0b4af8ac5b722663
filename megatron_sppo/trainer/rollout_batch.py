"""Rollouts as training tensors: prompt + response right-padded into one row per sample, with
the per-token masks and engine log-probs aligned to the predicted tokens (column t of a
[B, S-1] tensor belongs to token t + 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutTensors:
    """input_ids [B, S]; lengths [B]; prompt_lengths [B]; response_mask [B, S-1] (1 on
    response tokens); engine_logprobs [B, S-1] (the sampler's log-probs, 0 elsewhere)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    response_mask: torch.Tensor
    engine_logprobs: torch.Tensor


def pad_rollouts(prompts: list[list[int]], responses: list[list[int]],
                 logprobs: list[list[float]], pad_id: int = 0) -> RolloutTensors:
    """One row per (prompt, response) pair; ``logprobs[i]`` has one entry per response token."""
    if not (len(prompts) == len(responses) == len(logprobs)):
        raise ValueError("prompts, responses and logprobs need one entry per sample")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width - 1)
    engine = torch.zeros(len(prompts), width - 1)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        if len(lp) != len(r):
            raise ValueError(f"sample {i}: {len(lp)} log-probs for {len(r)} response tokens")
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        # token len(p) + j is predicted at column len(p) + j - 1
        mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0
        engine[i, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutTensors(ids, torch.tensor(lengths), torch.tensor([len(p) for p in prompts]),
                          mask, engine)


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, P] prompt ids and their [B] lengths (the critic's input)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts])
