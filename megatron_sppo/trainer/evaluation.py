"""Held-out evaluation during training (collective): the rollout engine samples k responses
per held-out prompt at the rollout temperature plus one greedy response, the reward scorer
checks them, and, when there is an SPPO critic, its V(prompt) is compared with each prompt's
empirical success rate over the k samples (Pearson, AUC against the sampled outcomes,
Brier score): how well the critic predicts what the policy can solve."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megatron_sppo.trainer.collectives import broadcast_object


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else float("nan")


def critic_eval_metrics(logits: torch.Tensor, outcomes: torch.Tensor) -> dict:
    """logits: [P] critic logits; outcomes: [P, k] 0/1 sampled results per prompt."""
    from megatron_sppo.algorithms import roc_auc

    v = torch.sigmoid(logits.double())
    k = outcomes.shape[1]
    flat_v = v.repeat_interleave(k)
    flat_o = outcomes.double().reshape(-1)
    return {"critic_pearson": pearson(v, outcomes.double().mean(1)),
            "critic_auc": float(roc_auc(flat_v, flat_o)),
            "critic_brier": float(((flat_v - flat_o) ** 2).mean())}


def selection_eval_metrics(logits: torch.Tensor, outcomes: torch.Tensor, floor: float,
                           ceiling: float) -> dict:
    """How well the critic ranks prompts for selection, against k sampled outcomes each:
    ``selection_signal_auc``, the chance that V(1 - V) ranks a prompt with mixed outcomes
    (it carries signal) above one whose k outcomes all agree; ``selection_too_hard_right``
    / ``selection_too_easy_right``, of the prompts with V below the floor / above the
    ceiling, the share whose k samples all failed / all succeeded (NaN when there are none);
    ``selection_too_hard_share`` / ``selection_too_easy_share``: how many prompts that is."""
    from megatron_sppo.algorithms import roc_auc
    from megatron_sppo.algorithms.selection import expected_signal

    v = torch.sigmoid(logits.double())
    solved = outcomes.double().mean(1)
    mixed = (solved > 0) & (solved < 1)
    hard, easy = v < floor, v > ceiling

    def share(mask: torch.Tensor, right: torch.Tensor) -> float:
        return right[mask].double().mean().item() if mask.any() else float("nan")

    return {"selection_signal_auc": float(roc_auc(expected_signal(v), mixed)),
            "selection_too_hard_right": share(hard, solved == 0),
            "selection_too_easy_right": share(easy, solved == 1),
            "selection_too_hard_share": hard.double().mean().item(),
            "selection_too_easy_share": easy.double().mean().item()}


def per_level(records, outcomes: torch.Tensor, greedy_right: torch.Tensor) -> dict:
    """Sampled and greedy pass@1 per difficulty level (``metadata["level"]``, as the
    arithmetic task and MATH carry it: which problems RL made solvable) and per evaluation
    file (``metadata["eval_file"]``: one benchmark each, as the paper reports them)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        for key, prefix in (("level", "level_"), ("eval_file", "")):
            if key in r.metadata:
                name = prefix + re.sub(r"\W+", "_", str(r.metadata[key]))
                groups.setdefault(name, []).append(i)
    out = {}
    for name, rows in sorted(groups.items()):
        out[f"pass1_sampled/{name}"] = outcomes[rows].mean().item()
        out[f"pass1_greedy/{name}"] = greedy_right[rows].mean().item()
    return out


def eval_seed(cfg, step: int) -> int:
    """The sampling seed of the held-out evaluation after ``step`` (the same for any trainer
    scored with :func:`sample_and_score`, so that equal models get equal figures)."""
    return cfg.trainer.seed * 7919 + step


def sample_and_score(engine, scorer, records, prompt_ids: list[list[int]], rollout, k: int,
                     seed: int) -> dict:
    """The held-out metrics of what ``engine`` holds: k samples per prompt at the rollout
    settings (``rollout``: the config's section) and one greedy response, checked by
    ``scorer``. ``outcomes`` [P, k] is among them. Shared by the trainer's evaluation and by
    tools/benchmark_vs_trl.py, which scores other trainers' checkpoints with it."""
    from megatron_sppo.rollout import SamplingParams

    r = rollout
    sampled = engine.generate(prompt_ids, SamplingParams(
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        max_new_tokens=r.max_response_length, stop=tuple(r.stop), n=k, seed=seed))
    greedy = engine.generate(prompt_ids, SamplingParams(
        temperature=0.0, max_new_tokens=r.max_response_length, stop=tuple(r.stop)))
    s = scorer.score(records, sampled)
    g = scorer.score(records, greedy)
    # status, not correctness: reward.shuffle (the control run) permutes the latter
    outcomes = torch.tensor([x == "correct" for x in s.status],
                            dtype=torch.float).reshape(len(records), k)
    lengths = [len(x.token_ids) for per in sampled for x in per]
    truncated = [x.truncated for per in sampled for x in per]
    greedy_right = torch.tensor([x == "correct" for x in g.status], dtype=torch.float)
    return {"outcomes": outcomes,
            "pass1_sampled": outcomes.mean().item(),
            f"pass{k}": outcomes.max(1).values.mean().item(),
            "pass1_greedy": greedy_right.mean().item(),
            "response_length_mean": sum(lengths) / len(lengths),
            "truncation_rate": sum(truncated) / len(truncated),
            **per_level(records, outcomes, greedy_right)}


def evaluate_heldout(c, records, k: int, seed: int) -> dict:
    """Collective over all ranks; returns the same metrics dict everywhere."""
    from megatron_sppo.trainer import rl_step

    result = None
    if dist.get_rank() == 0:
        result = sample_and_score(c.engine, c.scorer, records, c.prompt_ids(records),
                                  c.cfg.rollout, k, seed)
    result = broadcast_object(result)
    outcomes = result.pop("outcomes")
    if c.critic is not None and c.cfg.algorithm.estimator == "sppo":
        logits = rl_step.prompt_critic_logits(c.critic, *c.critic_inputs(records), c.cfg)
        result.update(critic_eval_metrics(logits, outcomes))
        if c.cfg.algorithm.prompt_selection:
            sel = c.cfg.algorithm.selection
            result.update(selection_eval_metrics(logits, outcomes, sel.floor, sel.ceiling))
    return {f"eval/{key}": value for key, value in result.items()}
