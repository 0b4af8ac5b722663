"""Critic-guided prompt selection for a step (``algorithm.prompt_selection``).

A candidate pool of ``selection.pool_factor`` x ``trainer.prompts_per_step`` prompts is drawn
from the data stream and scored by the SPPO critic in one prompt-only forward pass (no
generation); the rule in :mod:`megatron_sppo.algorithms.selection` keeps ``prompts_per_step``
of them and the skipped ones go back to the stream. Every rank draws and decides the same
(the critic's logits are shared with every rank; the rule's generator is seeded by the step),
so the stream stays identical everywhere and a resumed run makes the same choices.

The chosen prompts' logits are the critic's pre-update values for the step (the critic has
not changed since), so the step needs no second critic forward for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_sppo.algorithms.selection import select_prompts
from megatron_sppo.config import Config
from megatron_sppo.trainer import rl_step


@dataclass
class StepPrompts:
    """The step's prompt records, the critic's logits for them and the selection metrics."""

    records: list
    critic_logits: torch.Tensor
    metrics: dict


def _mean(x: torch.Tensor) -> float:
    return x.mean().item() if x.numel() else float("nan")


def select_step_prompts(c, cfg: Config, seed: int) -> StepPrompts:
    """Draw the pool, score it with the critic, keep ``prompts_per_step`` (collective)."""
    sel, k = cfg.algorithm.selection, cfg.trainer.prompts_per_step
    positions = c.prompts.draw(sel.pool_factor * k)
    pool = [c.prompts.records[i] for i in positions]
    ids, lengths = c.critic_inputs(pool)
    start = time.perf_counter()
    logits = rl_step.prompt_critic_logits(c.critic, ids, lengths, cfg)
    forward_seconds = time.perf_counter() - start
    values = torch.sigmoid(logits.double())
    choice = select_prompts(values, k, rule=sel.rule, floor=sel.floor, ceiling=sel.ceiling,
                            exploration=sel.exploration,
                            generator=torch.Generator().manual_seed(seed))
    c.prompts.give_back([positions[i] for i in choice.skipped])
    size = len(pool)
    metrics = {"selection_pool_size": float(size),
               "selection_critic_seconds": forward_seconds,
               "selection_value_chosen": _mean(values[choice.chosen]),
               "selection_value_skipped": _mean(values[choice.skipped]),
               "selection_skipped_too_hard": choice.too_hard / size,
               "selection_skipped_too_easy": choice.too_easy / size,
               "selection_explored": float(len(choice.explored))}
    return StepPrompts([pool[i] for i in choice.chosen], logits[choice.chosen], metrics)
