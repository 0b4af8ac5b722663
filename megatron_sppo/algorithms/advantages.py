"""Advantage estimators: SPPO and every baseline the paper compares, one small function each.

Each estimator reads what it needs from an ``AdvantageBatch`` of plain tensors and returns
token-level advantages [B, T] (zero outside the response mask) plus the returns its critic
regresses to. ``compute_advantages`` runs them under no_grad: an advantage is a fixed weight
on the policy gradient, and a critic learns from its own loss, never through the advantage.

Layout: sequence b has its response tokens where ``response_mask[b]`` is 1 (right padding,
or holes such as tool output, are skipped); ``group_index[b]`` names its prompt, so sequences
with the same index are the n samples of one prompt (no group_index = one sample per prompt).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_sppo.algorithms.checks import (AlgorithmInputError, check_binary, check_choice,
                                             check_shapes)
from megatron_sppo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from megatron_sppo.algorithms.masked import masked_whiten


@dataclass
class AdvantageBatch:
    """Plain tensors for one rollout batch: B sequences, T response positions.

    rewards: [B] the (possibly shaped) outcome reward of each response.
    response_mask: [B, T] 1 on response tokens that are trained on.
    group_index: [B] prompt id of each sequence (grpo/rloo need n >= 2 per id).
    critic_logits: [B] sppo: f(prompt), V = sigmoid(f) = predicted P(solved).
    correctness: [B] sppo: the 0/1 verifier result the critic learns; defaults to rewards.
    values: [B, T] gae: V(s_t) of the token-level critic at each response position.
    greedy_rewards: [B] remax: reward of the greedy response to the same prompt.
    logprobs, ref_logprobs: [B, T] rollout-policy and reference log-probs (KL in reward).
    """

    rewards: torch.Tensor
    response_mask: torch.Tensor
    group_index: torch.Tensor | None = None
    critic_logits: torch.Tensor | None = None
    correctness: torch.Tensor | None = None
    values: torch.Tensor | None = None
    greedy_rewards: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def __post_init__(self):
        if self.response_mask.dim() != 2:
            raise AlgorithmInputError(f"response_mask has shape {tuple(self.response_mask.shape)}"
                                      ", expected [B, T] (one row per sequence)")
        if not self.rewards.is_floating_point():
            self.rewards = self.rewards.to(torch.get_default_dtype())
        b = self.response_mask.shape[0]
        check_shapes((b,), rewards=self.rewards, group_index=self.group_index,
                     critic_logits=self.critic_logits, correctness=self.correctness,
                     greedy_rewards=self.greedy_rewards)
        check_shapes(self.response_mask.shape, values=self.values, logprobs=self.logprobs,
                     ref_logprobs=self.ref_logprobs)

    @property
    def mask(self) -> torch.Tensor:
        return self.response_mask.bool()

    def require(self, estimator: str, *fields: str) -> list[torch.Tensor]:
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise AlgorithmInputError(f"{estimator} needs batch.{', batch.'.join(missing)}: "
                                      "compute it before the advantage step")
        return [getattr(self, f) for f in fields]


@dataclass
class AdvantageOutput:
    """advantages: [B, T], 0 outside the mask.
    returns: the critic's regression target in the critic's shape: [B] 0/1 correctness for
    sppo (a prompt-level critic), [B, T] A + V for gae, the discounted return for
    reinforce_pp, the reward-to-go for remax, and the sequence's total reward on each
    response token for the critic-free grpo/rloo (for statistics only)."""

    advantages: torch.Tensor
    returns: torch.Tensor


Estimator = Callable[..., AdvantageOutput]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: make ``fn(batch, **options) -> AdvantageOutput`` selectable by ``name``."""
    def add(fn: Estimator) -> Estimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return add


@torch.no_grad()
def compute_advantages(name: str, batch: AdvantageBatch, **options) -> AdvantageOutput:
    """Run estimator ``name`` with its keyword options (e.g. gamma=1.0 for gae)."""
    check_choice("advantage estimator", name, ADVANTAGE_ESTIMATORS)
    fn = ADVANTAGE_ESTIMATORS[name]
    valid = list(inspect.signature(fn).parameters)[1:]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise AlgorithmInputError(f"{name} has no option {', '.join(unknown)}: its options are "
                                  f"{', '.join(valid) or 'none'}")
    return fn(batch, **options)


def check_estimator(name: str, n: int = 1, **options) -> None:
    """Config-time check: a dry run on a dummy batch of 2 prompts x n responses.

    Raises what a real step would (unknown name or option, bad option value, grpo/rloo with
    n = 1) and warns as it would (sppo with n > 1), before any model is built.
    """
    if n < 1:
        raise AlgorithmInputError(f"n={n} responses per prompt: use n >= 1")
    zeros, token_zeros = torch.zeros(2 * n), torch.zeros(2 * n, 2)
    compute_advantages(name, AdvantageBatch(
        rewards=zeros, response_mask=torch.ones(2 * n, 2, dtype=torch.bool),
        group_index=torch.arange(2).repeat_interleave(n), critic_logits=zeros,
        correctness=zeros, values=token_zeros, greedy_rewards=zeros, logprobs=token_zeros,
        ref_logprobs=token_zeros), **options)


# ---------------------------------------------------------------- shared pieces

def _per_token(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sequence scalar [B] to its response tokens [B, T]."""
    return torch.where(mask, seq[:, None], 0)


def _token_rewards(batch: AdvantageBatch, name: str, kl_coef: float,
                   kl_estimator: str) -> torch.Tensor:
    """r_t: the outcome reward on the last response token, minus kl_coef * KL_t on every one."""
    check_choice("KL estimator", kl_estimator, KL_ESTIMATORS)
    mask = batch.mask
    last = mask & (mask.flip(-1).cumsum(-1).flip(-1) == 1)  # 1 only on each row's final token
    rewards = _per_token(batch.rewards, last)
    if kl_coef:
        logprobs, ref = batch.require(name, "logprobs", "ref_logprobs")
        rewards = rewards - kl_coef * torch.where(mask, kl_penalty(logprobs, ref, kl_estimator), 0)
    return rewards


def _reverse_scan(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  gamma: float, lam: float) -> torch.Tensor:
    """GAE, backwards over each row's response tokens (masked positions are stepped over):
        delta_t = r_t + gamma * V_next - V_t        (V after the last token = 0)
        A_t     = delta_t + gamma * lam * A_next
    With V = 0 and lam = 1 this is the discounted return G_t = r_t + gamma * G_next."""
    advantages = torch.zeros_like(rewards)
    next_value = next_adv = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    return advantages


def _group_sizes(batch: AdvantageBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(group id 0..G-1 of each sequence, size of its group), both [B]."""
    if batch.group_index is None:
        ones = torch.ones_like(batch.rewards, dtype=torch.long)
        return torch.arange(len(ones), device=ones.device), ones
    _, inverse, counts = torch.unique(batch.group_index, return_inverse=True, return_counts=True)
    return inverse, counts[inverse]


def _group_sum(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """For each sequence, the sum of x over its group."""
    return x.new_zeros(int(inverse.max()) + 1).index_add_(0, inverse, x)[inverse]


def _groups_of_two_or_more(batch: AdvantageBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    inverse, size = _group_sizes(batch)
    if size.min() < 2:
        raise AlgorithmInputError(
            f"{name} needs n >= 2 responses per prompt (its baseline comes from the other "
            f"responses to the same prompt), got a prompt with {int(size.min())}: set n >= 2 "
            "and pass group_index, or use sppo/remax/reinforce_pp for one response per prompt")
    return inverse, size


# ---------------------------------------------------------------- estimators

@register_estimator("sppo")
def sppo(batch: AdvantageBatch, normalize: bool = False) -> AdvantageOutput:
    """SPPO: A = R - V(prompt), V = sigmoid(critic logit), one scalar per sequence.

    The critic learns P(solved), so its target is the 0/1 correctness, which may differ from a
    shaped R (format penalties). normalize whitens A over the batch's sequences (off in the
    paper's runs).
    """
    (logits,) = batch.require("sppo", "critic_logits")
    correctness = batch.rewards if batch.correctness is None else batch.correctness
    check_binary("sppo's critic target (batch.correctness, or batch.rewards when it is None)",
                 correctness)
    if _group_sizes(batch)[1].max() > 1:
        warnings.warn("sppo with n > 1 responses per prompt is not the paper's setting (N = 1): "
                      "the critic baseline is unchanged, only the batch has repeated prompts")
    adv = batch.rewards - torch.sigmoid(logits)
    if normalize:
        adv = masked_whiten(adv, batch.mask.any(-1))
    return AdvantageOutput(_per_token(adv, batch.mask), correctness.to(adv.dtype))


@register_estimator("gae")
def gae(batch: AdvantageBatch, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True,
        kl_coef: float = 0.0, kl_estimator: str = "k1") -> AdvantageOutput:
    """Token-level PPO: GAE(gamma, lam) on a token-level critic; returns = A + V.

    The paper's PPO baseline uses gamma = lam = 1. whiten (standard PPO practice) normalises
    A over all response tokens of the batch; the returns are taken before whitening.
    """
    (values,) = batch.require("gae", "values")
    rewards = _token_rewards(batch, "gae", kl_coef, kl_estimator)
    adv = _reverse_scan(rewards, values, batch.mask, gamma, lam)
    returns = torch.where(batch.mask, adv + values, 0)
    return AdvantageOutput(masked_whiten(adv, batch.mask) if whiten else adv, returns)


@register_estimator("grpo")
def grpo(batch: AdvantageBatch, eps: float = 1e-6, norm_by_std: bool = True) -> AdvantageOutput:
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps) over the n responses of prompt g.

    std is the unbiased one. norm_by_std=False is Dr. GRPO: dividing by std over-weights
    prompts that are almost always (or never) solved.
    """
    inverse, size = _groups_of_two_or_more(batch, "grpo")
    rewards = batch.rewards
    centered = rewards - _group_sum(rewards, inverse) / size
    std = (_group_sum(centered**2, inverse) / (size - 1)).sqrt()
    adv = centered / (std + eps) if norm_by_std else centered
    return AdvantageOutput(_per_token(adv, batch.mask), _per_token(rewards, batch.mask))


@register_estimator("rloo")
def rloo(batch: AdvantageBatch, kl_coef: float = 0.0, kl_estimator: str = "k1") -> AdvantageOutput:
    """RLOO: A_i = R_i - mean_{j != i} R_j over the other responses to the same prompt.

    R_i is the sequence total of the token rewards, so KL in reward enters as -kl_coef * sum_t KL_t.
    """
    inverse, size = _groups_of_two_or_more(batch, "rloo")
    total = _token_rewards(batch, "rloo", kl_coef, kl_estimator).sum(-1)
    adv = total - (_group_sum(total, inverse) - total) / (size - 1)
    return AdvantageOutput(_per_token(adv, batch.mask), _per_token(total, batch.mask))


@register_estimator("remax")
def remax(batch: AdvantageBatch, kl_coef: float = 0.0, kl_estimator: str = "k1") -> AdvantageOutput:
    """ReMax: A_t = G_t - R(greedy response to the same prompt), where G_t = sum_{t' >= t} r_t'
    is the reward-to-go of the token rewards (the outcome on the last token, minus
    kl_coef * KL_t on each one) and the greedy response's R is its outcome alone (Li et al.
    2023; verl's compute_remax_outcome_advantage). Without KL every token gets R - R_greedy.
    Returns G_t."""
    (greedy,) = batch.require("remax", "greedy_rewards")
    rewards = _token_rewards(batch, "remax", kl_coef, kl_estimator)
    to_go = _reverse_scan(rewards, torch.zeros_like(rewards), batch.mask, 1.0, 1.0)
    return AdvantageOutput(torch.where(batch.mask, to_go - greedy[:, None], 0), to_go)


@register_estimator("reinforce_pp")
def reinforce_pp(batch: AdvantageBatch, gamma: float = 1.0, kl_coef: float = 0.0,
                 kl_estimator: str = "k1") -> AdvantageOutput:
    """REINFORCE++: G_t = r_t + gamma * G_{t+1} on KL-shaped token rewards, then whitened over
    all response tokens of the batch (a global baseline instead of a critic or a group)."""
    rewards = _token_rewards(batch, "reinforce_pp", kl_coef, kl_estimator)
    returns = _reverse_scan(rewards, torch.zeros_like(rewards), batch.mask, gamma, 1.0)
    return AdvantageOutput(masked_whiten(returns, batch.mask), returns)
