"""Critic-guided prompt selection: which ``k`` prompts of a candidate pool to generate for,
from the critic's predicted success V(prompt) alone (no generation).

With one 0/1 response per prompt the SPPO advantage is R - V; its expected squared size,
the learning signal a prompt carries, is the outcome variance V(1 - V): zero for a prompt
the policy always or never solves, largest at V = 1/2. The rules:

- ``weighted`` (default): draw without replacement with probability proportional to
  V(1 - V) among the prompts with ``floor <= V <= ceiling``;
- ``filter``: uniformly among the prompts inside the band (the band alone decides);
- ``sample``: proportional to V(1 - V) over the whole pool (no band);
- ``topk``: the ``k`` largest V(1 - V) (deterministic; ties by pool order).

Every rule first draws ``round(exploration * k)`` prompts uniformly from the whole pool, so
the critic keeps seeing outcomes of prompts it would skip (a prompt that has become learnable
is found again). When the band holds too few prompts, the rest are those out of band with the
largest V(1 - V), nearest the band. Weighted draws use exponential keys (Efraimidis and
Spirakis: the ``k`` smallest ``-log(u) / w``), so a seeded generator fixes the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sppo.algorithms.checks import AlgorithmInputError

SELECTION_RULES = ("weighted", "filter", "sample", "topk")


@dataclass
class Selection:
    """Pool indices: ``chosen`` (ascending), of which ``explored`` were drawn uniformly;
    ``skipped`` (ascending) the rest. ``too_hard``/``too_easy``: skipped below the floor /
    above the ceiling."""

    chosen: list[int]
    explored: list[int]
    skipped: list[int]
    too_hard: int
    too_easy: int


def expected_signal(values: torch.Tensor) -> torch.Tensor:
    """V(1 - V): the variance of a 0/1 outcome with success probability V."""
    return values * (1 - values)


def _top(keys: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` candidates with the largest keys; ties go to the earlier pool index."""
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    order = torch.sort(keys[candidates], descending=True, stable=True).indices
    return candidates[order[:k]]


def _weighted_draw(weights: torch.Tensor, candidates: torch.Tensor, k: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``k`` candidates without replacement, each draw proportional to its weight (zero
    weights come last, in pool order)."""
    u = torch.rand(weights.shape, generator=generator, dtype=torch.float64)
    w = weights.double()
    keys = torch.where(w > 0, torch.log(u) / w, torch.full_like(w, -torch.inf))
    return _top(keys, candidates, k)


def check_selection(rule: str, floor: float, ceiling: float, exploration: float) -> None:
    if rule not in SELECTION_RULES:
        raise AlgorithmInputError(f"selection rule {rule!r}: use one of "
                                  f"{', '.join(SELECTION_RULES)}")
    if not 0 <= floor < ceiling <= 1:
        raise AlgorithmInputError(f"selection floor={floor}, ceiling={ceiling}: need "
                                  "0 <= floor < ceiling <= 1")
    if not 0 <= exploration <= 1:
        raise AlgorithmInputError(f"selection exploration={exploration} must lie in [0, 1]")


def select_prompts(values: torch.Tensor, k: int, *, rule: str = "weighted",
                   floor: float = 0.05, ceiling: float = 0.95, exploration: float = 0.1,
                   generator: torch.Generator | None = None) -> Selection:
    """Choose ``k`` of the pool's prompts from their predicted success ``values`` [M]."""
    check_selection(rule, floor, ceiling, exploration)
    values = values.detach().double().flatten()
    pool = values.numel()
    if not 0 < k <= pool:
        raise AlgorithmInputError(f"cannot choose {k} prompts from a pool of {pool}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    signal = expected_signal(values)
    explore_n = round(exploration * k)
    explored = torch.randperm(pool, generator=generator)[:explore_n]
    # drawn even when unused, so the exploration draw is the same for every rule
    uniform_keys = torch.rand(pool, generator=generator, dtype=torch.float64)
    left = torch.ones(pool, dtype=torch.bool)
    left[explored] = False
    rest = torch.arange(pool)[left]
    need = k - explore_n
    in_band = (values >= floor) & (values <= ceiling)
    if rule in ("weighted", "filter"):
        band = rest[in_band[rest]]
        if rule == "weighted":
            picked = _weighted_draw(signal, band, need, generator)
        else:
            picked = _top(uniform_keys, band, need)
        outside = rest[~in_band[rest]]
        picked = torch.cat([picked, _top(signal, outside, need - picked.numel())])
    elif rule == "sample":
        picked = _weighted_draw(signal, rest, need, generator)
    else:
        picked = _top(signal, rest, need)
    chosen = torch.zeros(pool, dtype=torch.bool)
    chosen[explored] = True
    chosen[picked] = True
    skipped = ~chosen
    return Selection(chosen=torch.nonzero(chosen).flatten().tolist(),
                     explored=sorted(explored.tolist()),
                     skipped=torch.nonzero(skipped).flatten().tolist(),
                     too_hard=int((skipped & (values < floor)).sum()),
                     too_easy=int((skipped & (values > ceiling)).sum()))


def informative_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """[G] bool: which groups of ``n`` consecutive rewards are not all equal (DAPO's dynamic
    sampling keeps only these: a group-relative advantage is zero for the others)."""
    if n < 1 or rewards.numel() % n:
        raise AlgorithmInputError(f"{rewards.numel()} rewards do not form groups of {n}")
    groups = rewards.reshape(-1, n)
    return groups.amax(1) != groups.amin(1)
