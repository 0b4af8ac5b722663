"""A step's rollouts and rewards, with DAPO's dynamic sampling for the group estimators.

Without ``algorithm.dynamic_sampling`` this is one generation for the step's prompts and
their scores. With it (grpo, rloo; DAPO, Yu et al. 2025, verl's ``filter_groups``), groups
whose rewards are all equal (after the truncation policy) are dropped, since their
group-relative advantage is zero, and more prompts are drawn from the stream and generated
until ``prompts_per_step`` groups remain, in at most ``dynamic_sampling_max_rounds`` rounds.
A later round generates for ``missing / keep rate so far`` prompts (at least the missing
number, at most eight times it), so most steps need one or two extra rounds; informative
groups beyond the batch are dropped too. A batch still short after the last round is filled
with dropped groups (``dynamic_sampling_filled``). ``generated_tokens`` counts every
generated token, dropped groups included: the cost of the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_sppo.algorithms.selection import informative_groups
from megatron_sppo.config import Config
from megatron_sppo.rewards.registry import Scored, combine_scored
from megatron_sppo.rollout.engine import sample_seed
from megatron_sppo.trainer.components import step_outcomes

MAX_OVERSAMPLING = 8


@dataclass
class StepRollouts:
    """The step's prompts (one group each), their rollouts and scores, and what was spent."""

    records: list
    rollouts: dict
    scored: Scored
    generated_tokens: float
    metrics: dict


def _tokens(samples: list) -> int:
    return sum(len(s.token_ids) for per_prompt in samples for s in per_prompt)


def generate_and_score(c, cfg: Config, records: list, seed: int, timer,
                       release_weights: bool = True) -> StepRollouts:
    """Collective: rollouts and rewards of ``records`` (more prompts with dynamic sampling);
    ``release_weights``: the engine may drop its weights for training (a sync follows)."""
    with timer("rollout"):
        c.colocation.for_rollout()
        rollouts = c.generate(records, seed)
    with timer("reward"):
        scored = c.score(records, rollouts)
    out = StepRollouts(records, rollouts, scored, float(_tokens(rollouts["samples"])), {})
    if cfg.algorithm.dynamic_sampling:
        out = _fill_with_informative_groups(c, cfg, out, seed, timer)
    with timer("rollout"):
        c.colocation.for_training(release_weights=release_weights)
    return out


def _informative(cfg: Config, samples: list, scored: Scored) -> list[bool]:
    truncated = torch.tensor([s.truncated for per in samples for s in per], dtype=torch.bool)
    rewards, _ = step_outcomes(cfg, scored, truncated)
    return informative_groups(rewards, cfg.rollout.n).tolist()


def _fill_with_informative_groups(c, cfg: Config, first: StepRollouts, seed: int,
                                  timer) -> StepRollouts:
    want, n = cfg.trainer.prompts_per_step, cfg.rollout.n
    kept: list[tuple[int, int]] = []      # (round, group) in the order kept
    dropped: list[tuple[int, int]] = []
    rounds = [(first.records, first.rollouts, first.scored)]
    tokens, drawn, informative_seen = first.generated_tokens, len(first.records), 0
    while True:
        r = len(rounds) - 1
        records, rollouts, scored = rounds[r]
        for g, useful in enumerate(_informative(cfg, rollouts["samples"], scored)):
            informative_seen += useful
            (kept if useful and len(kept) < want else dropped).append((r, g))
        missing = want - len(kept)
        if not missing or len(rounds) == cfg.algorithm.dynamic_sampling_max_rounds:
            break
        rate = informative_seen / drawn
        count = min(MAX_OVERSAMPLING * missing, math.ceil(missing / rate) if rate else
                    MAX_OVERSAMPLING * missing)
        with timer("data"):
            records = c.prompts.next_batch(count)
        round_seed = sample_seed(seed, -1, len(rounds))
        with timer("rollout"):
            rollouts = c.generate(records, round_seed)
        with timer("reward"):
            scored = c.score(records, rollouts)
        rounds.append((records, rollouts, scored))
        tokens += _tokens(rollouts["samples"])
        drawn += count
    filled = want - len(kept)
    kept = sorted(kept + (dropped[len(dropped) - filled:] if filled else []))
    keep_rows: list[list[int]] = [[] for _ in rounds]
    for r, g in kept:
        keep_rows[r] += list(range(g * n, (g + 1) * n))
    scored = combine_scored([s for _, _, s in rounds], keep_rows)
    records = [rounds[r][0][g] for r, g in kept]
    samples = [rounds[r][1]["samples"][g] for r, g in kept]
    metrics = {"dynamic_sampling_rounds": float(len(rounds)),
               "dynamic_sampling_groups": float(drawn),
               "dynamic_sampling_informative_fraction": informative_seen / drawn,
               "dynamic_sampling_filled": float(filled)}
    return StepRollouts(records, {"samples": samples}, scored, tokens, metrics)
