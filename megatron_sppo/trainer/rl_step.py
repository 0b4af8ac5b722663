"""The Megatron side of one RL step: critic values, old/reference log-probs, advantages, and
the critic and policy updates over PPO mini-batches and epochs.

Every rank holds the whole step batch; each data-parallel replica runs its rows through
megatron-core's schedules, and per-row results are shared with every rank
(trainer/collectives.py), so advantages are computed once per rank on identical tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_sppo.algorithms import AdvantageBatch, compute_advantages
from megatron_sppo.config import Config
from megatron_sppo.trainer.collectives import data_parallel_rows, share_rows, sum_stats
from megatron_sppo.trainer.critic_update import (CriticBatch, TokenCriticBatch,
                                                 critic_forward_backward,
                                                 token_critic_forward_backward)
from megatron_sppo.trainer.models import TrainedModel
from megatron_sppo.trainer.policy_update import PolicyBatch, policy_forward_backward
from megatron_sppo.trainer.rollout_batch import RolloutTensors

POLICY_STATS = ("policy/clipfrac", "policy/clipfrac_low", "policy/clipfrac_high",
                "policy/dual_clipfrac", "policy/approx_kl_k3", "policy/approx_kl_k2",
                "policy/entropy")


@dataclass
class StepBatch:
    """One step's samples (B = prompts x n), identical on every rank.

    critic_prompt_ids/lengths: the prompts in the critic's tokenization (SPPO critic input).
    loss_mask: response_mask with truncated responses removed when the config drops them.
    """

    tensors: RolloutTensors
    group_index: torch.Tensor
    rewards: torch.Tensor
    correctness: torch.Tensor
    truncated: torch.Tensor
    loss_mask: torch.Tensor
    critic_prompt_ids: torch.Tensor | None = None
    critic_prompt_lengths: torch.Tensor | None = None
    greedy_rewards: torch.Tensor | None = None
    critic_logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.rewards.shape[0]


def _local(model, rows: list[int]) -> list[int]:
    return data_parallel_rows(rows, model.groups)


def _global_rows(results: list[dict], mine: list[int]) -> list[dict]:
    """Forward-only results index rows of the local batch: map them to the step batch."""
    return [{**r, "rows": [mine[k] for k in r["rows"]]} for r in results]


def _policy_batch(batch: StepBatch, rows: list[int], with_targets: bool) -> PolicyBatch:
    t = batch.tensors
    pb = PolicyBatch(t.input_ids[rows], t.lengths[rows], batch.loss_mask[rows])
    if with_targets:
        pb.old_logprobs = None if batch.old_logprobs is None else batch.old_logprobs[rows]
        pb.advantages = batch.advantages[rows]
        pb.rollout_logprobs = t.engine_logprobs[rows]
        pb.ref_logprobs = None if batch.ref_logprobs is None else batch.ref_logprobs[rows]
    return pb.micro(list(range(len(rows))))


@torch.no_grad()
def forward_logprobs(model: TrainedModel, batch: StepBatch, cfg: Config) -> torch.Tensor:
    """[B, S-1] log-probs of the taken tokens under ``model`` (policy or reference), on
    every rank; forward-only with token-budget micro-batches."""
    mine = _local(model, list(range(batch.size)))
    results = policy_forward_backward(
        model.ddp, _policy_batch(batch, mine, False), vocab_size=model.arch.vocab_size,
        temperature=cfg.rollout.temperature, max_tokens=cfg.trainer.max_tokens_per_microbatch,
        forward_only=True, layout=model.layout)
    return share_rows(_global_rows(results, mine), "logprobs",
                      tuple(batch.tensors.response_mask.shape), model.groups)


@torch.no_grad()
def prompt_critic_logits(critic: TrainedModel, prompt_ids: torch.Tensor,
                         prompt_lengths: torch.Tensor, cfg: Config) -> torch.Tensor:
    """[B] SPPO critic logits f(prompt) of right-padded prompts, on every rank: one
    forward-only pass through megatron-core's schedule at the critic's layout (the step's
    values, held-out probes and the prompt-selection pool)."""
    mine = _local(critic, list(range(prompt_ids.shape[0])))
    cb = CriticBatch(prompt_ids[mine], prompt_lengths[mine])
    results = critic_forward_backward(critic.ddp, cb.micro(list(range(len(mine)))),
                                      max_tokens=cfg.trainer.max_tokens_per_microbatch,
                                      forward_only=True, layout=critic.layout)
    return share_rows(_global_rows(results, mine), "logits", (prompt_ids.shape[0],),
                      critic.groups)


@torch.no_grad()
def critic_values(critic: TrainedModel, batch: StepBatch, cfg: Config) -> None:
    """Pre-update critic outputs: SPPO's f(prompt) per sample, or gae's V per token."""
    if cfg.algorithm.estimator == "sppo":
        batch.critic_logits = prompt_critic_logits(critic, batch.critic_prompt_ids,
                                                   batch.critic_prompt_lengths, cfg)
    else:
        mine = _local(critic, list(range(batch.size)))
        max_tokens = cfg.trainer.max_tokens_per_microbatch
        t = batch.tensors
        tb = TokenCriticBatch(t.input_ids[mine], t.lengths[mine], batch.loss_mask[mine])
        results = token_critic_forward_backward(critic.ddp, tb.micro(list(range(len(mine)))),
                                                max_tokens=max_tokens, forward_only=True,
                                                layout=critic.layout)
        batch.values = share_rows(_global_rows(results, mine), "values",
                                  tuple(t.response_mask.shape), critic.groups)


def clamped_logit(p: float, eps: float) -> float:
    """logit(p) with p clamped to [eps, 1 - eps], so a batch all right or all wrong stays finite."""
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def running_mean_baseline(state: dict, batch: StepBatch, momentum: float) -> None:
    """SPPO's critic ablation: V = the running mean of past batches' success rate (the first
    batch's own rate at the start), one value for every prompt, written as logits where the
    sppo estimator reads the critic's; the mean lives in ``state`` (checkpointed)."""
    rate = batch.correctness.mean().item()
    mean = state.get("baseline_mean", rate)
    batch.critic_logits = torch.full((batch.size,), clamped_logit(mean, 1e-3))
    state["baseline_mean"] = momentum * mean + (1 - momentum) * rate


def set_head_bias(critic: TrainedModel, success_rate: float) -> float:
    """Set the scalar head's bias to logit(success rate) (clamped to [0.02, 0.98]), before
    the step's values are computed; returns the new bias."""
    bias = clamped_logit(success_rate, 0.02)
    head = getattr(critic.module, "output_layer", None)
    if head is not None and hasattr(head, "bias"):  # last pipeline stage holds the head
        with torch.no_grad():
            head.bias.fill_(bias)
        # the optimizer keeps fp32 main params: refresh them from the model
        critic.optimizer.reload_model_params()
    return bias


def compute_step_advantages(batch: StepBatch, cfg: Config) -> None:
    a = cfg.algorithm
    out = compute_advantages(a.estimator, AdvantageBatch(
        rewards=batch.rewards, response_mask=batch.tensors.response_mask,
        group_index=batch.group_index, critic_logits=batch.critic_logits,
        correctness=batch.correctness, values=batch.values,
        greedy_rewards=batch.greedy_rewards, logprobs=batch.old_logprobs,
        ref_logprobs=batch.ref_logprobs), **a.estimator_options())
    batch.advantages, batch.returns = out.advantages, out.returns


def mini_batches(batch: StepBatch, cfg: Config, seed: int,
                 size: int | None = None) -> list[list[int]]:
    """Sample rows of each PPO mini-batch of ``size`` prompts (default
    ``trainer.mini_batch_size``) for every epoch; a prompt's n samples stay together and the
    prompt order is reshuffled each epoch (seeded by step and epoch)."""
    prompts = int(batch.group_index.max()) + 1
    per = size or cfg.trainer.mini_batch_size or prompts
    out = []
    for epoch in range(cfg.trainer.ppo_epochs):
        order = (torch.randperm(prompts, generator=torch.Generator().manual_seed(seed + epoch))
                 if epoch else torch.arange(prompts))
        for start in range(0, prompts, per):
            chosen = set(order[start:start + per].tolist())
            out.append([i for i in range(batch.size) if int(batch.group_index[i]) in chosen])
    return out


def single_update(batch: StepBatch, cfg: Config, size: int | None = None) -> bool:
    """One optimizer step on the whole batch (one PPO epoch, one mini-batch of ``size``
    prompts). Its forward then runs the pre-update weights over every row, so what a
    separate forward pass would compute before it comes out of the update's own forward,
    detached, exactly (as TRL's GRPOTrainer does with num_iterations=1): a full forward pass
    saved per model."""
    return len(mini_batches(batch, cfg, seed=0, size=size)) == 1


def old_logprobs_from_update(batch: StepBatch, cfg: Config) -> bool:
    """The policy's old log-probs come from its update's forward: a single update, the
    policy's own log-probs wanted, and no advantage that needs them first (KL in reward)."""
    a = cfg.algorithm
    return a.old_logprobs == "policy" and not a.kl_in_reward and single_update(batch, cfg)


def critic_values_from_update(batch: StepBatch, cfg: Config) -> bool:
    """SPPO's pre-update V(prompt) comes from the critic update's forward: a single update,
    and the BCE target (the 0/1 outcome) does not depend on the advantage."""
    return (cfg.algorithm.estimator == "sppo"
            and single_update(batch, cfg, cfg.critic_mini_batch_size))


def _run_update(model: TrainedModel, run, rows_per_mini: list[list[int]]) -> list[dict]:
    """One optimizer step per mini-batch; returns per-mini-batch statistics."""
    stats = []
    for rows in rows_per_mini:
        mine = _local(model, rows)
        model.zero_grad()
        results = run(mine)
        applied, grad_norm = model.step()
        stats.append({"results": results, "applied": applied, "grad_norm": grad_norm})
    return stats


def update_critic(critic: TrainedModel, batch: StepBatch, cfg: Config, seed: int) -> dict:
    """The critic's update. SPPO without ``batch.critic_logits`` (a single update: see
    :func:`critic_values_from_update`) takes them from the update's own forward."""
    max_tokens = cfg.trainer.max_tokens_per_microbatch
    t = batch.tensors

    def run(mine):
        if cfg.algorithm.estimator == "sppo":
            cb = CriticBatch(batch.critic_prompt_ids[mine], batch.critic_prompt_lengths[mine],
                             batch.correctness[mine])
            return _global_rows(critic_forward_backward(
                critic.ddp, cb.micro(list(range(len(mine)))), max_tokens=max_tokens,
                layout=critic.layout), mine)
        tb = TokenCriticBatch(t.input_ids[mine], t.lengths[mine], batch.loss_mask[mine],
                              batch.values[mine], batch.returns[mine])
        return token_critic_forward_backward(critic.ddp, tb.micro(list(range(len(mine)))),
                                             max_tokens=max_tokens, layout=critic.layout,
                                             clip_range=cfg.algorithm.value_clip)

    stats = _run_update(critic, run, mini_batches(batch, cfg, seed,
                                                  cfg.critic_mini_batch_size))
    if cfg.algorithm.estimator == "sppo" and batch.critic_logits is None:
        (only,) = stats
        batch.critic_logits = share_rows(only["results"], "logits", (batch.size,),
                                         critic.groups)
    sums = [sum_stats(s["results"], ["loss_sum", "denominator"], critic.groups) for s in stats]
    return {"critic_loss": _mean([s["loss_sum"] / max(s["denominator"], 1) for s in sums]),
            "critic_grad_norm": _mean([s["grad_norm"] for s in stats]),
            "critic_skipped": sum(not s["applied"] for s in stats),
            "critic_lr": critic.lr}


def update_policy(policy: TrainedModel, batch: StepBatch, cfg: Config, seed: int) -> dict:
    """The policy's PPO update. Without ``batch.old_logprobs`` (a single update: see
    :func:`old_logprobs_from_update`) they come from the update's own forward."""
    loss_cfg = cfg.loss_config()
    fresh = batch.old_logprobs is None

    def run(mine):
        results = policy_forward_backward(
            policy.ddp, _policy_batch(batch, mine, True), vocab_size=policy.arch.vocab_size,
            temperature=cfg.rollout.temperature,
            max_tokens=cfg.trainer.max_tokens_per_microbatch, loss_cfg=loss_cfg,
            layout=policy.layout)
        return _global_rows(results, mine) if fresh else results

    stats = _run_update(policy, run, mini_batches(batch, cfg, seed))
    if fresh:
        (only,) = stats
        batch.old_logprobs = share_rows(only["results"], "logprobs",
                                        tuple(batch.tensors.response_mask.shape), policy.groups)
    keys = ["loss_sum", "denominator", "tokens", *POLICY_STATS]
    sums = [sum_stats(s["results"], keys, policy.groups) for s in stats]
    tokens = sum(s["tokens"] for s in sums)
    out = {"policy_loss": _mean([s["loss_sum"] / max(s["denominator"], 1) for s in sums]),
           "grad_norm": _mean([s["grad_norm"] for s in stats]),
           "policy_skipped": sum(not s["applied"] for s in stats),
           "policy_lr": policy.lr}
    for key in POLICY_STATS:
        out[key.split("/", 1)[1]] = sum(s[key] for s in sums) / max(tokens, 1)
    out["clip_fraction"] = out.pop("clipfrac")
    out["approx_kl"] = out.pop("approx_kl_k3")
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
