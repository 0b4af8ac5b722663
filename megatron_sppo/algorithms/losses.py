"""Policy and value losses, per token, with aggregation that stays exact under micro-batching.

Every loss returns a ``LossOutput``: ``loss = loss_sum / denominator`` plus the two parts.
Megatron's schedule, with ``calculate_per_token_loss``, takes ``(loss_sum, denominator, dict)``
from each micro-batch, sums both over micro-batches and data-parallel ranks and divides once,
so the step's loss is the true mean over the whole mini-batch however it was split. The
denominator is the number of loss tokens for ``token-mean`` and the number of sequences (with
at least one loss token) for the ``seq-mean-*`` modes. A caller that already knows the global
denominator can pass it instead; then each micro-batch's ``loss`` is its exact share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_sppo.algorithms.checks import (AlgorithmInputError, check_binary, check_choice,
                                             check_positive, check_shapes)
from megatron_sppo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from megatron_sppo.algorithms.masked import masked_sum

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
Denominator = torch.Tensor | int | float | None


@dataclass
class LossOutput:
    """loss: loss_sum / denominator (backprop this for a whole batch).
    loss_sum, denominator: the Megatron per-token-loss pair (see module docstring).
    per_token: the elementwise loss, 0 outside the mask (for metrics)."""

    loss: torch.Tensor
    loss_sum: torch.Tensor
    denominator: torch.Tensor
    per_token: torch.Tensor


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              denominator: Denominator = None) -> LossOutput:
    """Reduce a per-token loss [B, T] (or per-sequence [B]) to a scalar.

    token-mean:          sum_{b,t} m l / sum_{b,t} m           every token weighs the same
    seq-mean-token-mean: sum_b (sum_t m l / sum_t m) / S       every sequence weighs the same
    seq-mean-token-sum:  sum_b sum_t m l / S                   (S = sequences with a token)
    """
    check_choice("loss aggregation mode", mode, AGG_MODES)
    mask = mask.bool()
    if mode == "token-mean":
        loss_sum, count = masked_sum(per_token, mask), mask.sum()
    else:
        tokens = mask.sum(-1)
        per_seq = masked_sum(per_token, mask, -1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / tokens.clamp_min(1)
        loss_sum, count = per_seq.sum(), (tokens > 0).sum()
    if denominator is not None:
        count = torch.as_tensor(denominator, device=loss_sum.device)
    return LossOutput(loss_sum / count.clamp_min(1), loss_sum, count,
                      torch.where(mask, per_token, 0))


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyperparameters of the policy loss, validated when built (i.e. at config time).

    eps_low/eps_high: ratio clip range [1 - eps_low, 1 + eps_high] (decoupled, as DAPO).
    dual_clip: c > 1 caps the loss of A < 0 tokens at -c * A (None = off).
    tis_cap: truncated importance sampling against the rollout engine's log-probs, weight
        min(pi_old / pi_rollout, tis_cap) (None = off).
    kl_coef, kl_estimator: KL(pi || pi_ref) loss term (0 = off, the SPPO default).
    entropy_coef: entropy bonus (0 = off).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    agg: str = "token-mean"
    tis_cap: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self):
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise AlgorithmInputError(f"eps_low={self.eps_low}, eps_high={self.eps_high}: need "
                                      "0 <= eps_low < 1 and eps_high >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise AlgorithmInputError(f"dual_clip={self.dual_clip} must be > 1 (it caps the "
                                      "ratio for A < 0 above 1 + eps_high), or None to disable")
        check_positive(tis_cap=self.tis_cap)
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise AlgorithmInputError(f"kl_coef={self.kl_coef}, entropy_coef="
                                      f"{self.entropy_coef} must be >= 0")
        check_choice("loss aggregation mode", self.agg, AGG_MODES)
        check_choice("KL estimator", self.kl_estimator, KL_ESTIMATORS)


@dataclass
class PolicyLossOutput(LossOutput):
    """Adds per-token diagnostics [B, T] for metrics: log_ratio = log pi - log pi_old, where
    the ratio clip is active (below 1 - eps_low for A < 0, above 1 + eps_high for A > 0), where
    the dual clip is active, and the KL term / importance weight when they are on."""

    log_ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor
    kl: torch.Tensor | None = None
    is_weight: torch.Tensor | None = None


def _require(tensor: torch.Tensor | None, what: str, why: str) -> torch.Tensor:
    if tensor is None:
        raise AlgorithmInputError(f"{why} needs {what}: pass it, or turn that term off")
    return tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: PolicyLossConfig = PolicyLossConfig(), *,
                rollout_logprobs: torch.Tensor | None = None,
                ref_logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                denominator: Denominator = None) -> PolicyLossOutput:
    """PPO clipped surrogate per token (+ optional KL and entropy terms), aggregated.

    All tensors are [B, T]; advantages are constants (no grad).
    """
    check_shapes(logprobs.shape, old_logprobs=old_logprobs, advantages=advantages,
                 response_mask=response_mask, rollout_logprobs=rollout_logprobs,
                 ref_logprobs=ref_logprobs, entropy=entropy)
    # r_t = pi(a_t) / pi_old(a_t), in log space; the clamp only keeps exp() finite
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    # PPO: L_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), the pessimistic bound
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    pg = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    # dual clip: for A < 0, -A r grows without bound in r; cap it at -c A (no gradient there)
    dual = torch.zeros_like(clip_active)
    if cfg.dual_clip is not None:
        cap = -advantages * cfg.dual_clip
        dual = (advantages < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
    # rollout correction: the samples came from the engine's pi_rollout, not pi_old
    is_weight = None
    if cfg.tis_cap is not None:
        rollout = _require(rollout_logprobs, "rollout_logprobs", "tis_cap")
        is_weight = torch.exp(old_logprobs - rollout).clamp(max=cfg.tis_cap).detach()
        pg = pg * is_weight
    per_token, kl = pg, None
    if cfg.kl_coef:
        ref = _require(ref_logprobs, "ref_logprobs", f"kl_coef={cfg.kl_coef}")
        kl = kl_penalty(logprobs, ref, cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef:
        per_token = per_token - cfg.entropy_coef * _require(entropy, "entropy",
                                                            f"entropy_coef={cfg.entropy_coef}")
    out = aggregate(per_token, response_mask, cfg.agg, denominator)
    return PolicyLossOutput(**vars(out), log_ratio=log_ratio.detach(),
                            clipped_low=clip_active & (ratio < 1),
                            clipped_high=clip_active & (ratio > 1), dual_clipped=dual,
                            kl=kl, is_weight=is_weight)


def bce_value_loss(logits: torch.Tensor, correctness: torch.Tensor,
                   denominator: Denominator = None) -> LossOutput:
    """SPPO critic: BCE(f(s_p), y) = softplus(f) - y f, y the 0/1 correctness; mean over
    prompts (denominator = number of prompts unless given)."""
    check_shapes(logits.shape, correctness=correctness)
    check_binary("correctness", correctness)
    per_prompt = F.binary_cross_entropy_with_logits(logits, correctness.to(logits.dtype),
                                                    reduction="none")
    return aggregate(per_prompt, torch.ones_like(per_prompt, dtype=torch.bool),
                     denominator=denominator)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       response_mask: torch.Tensor, clip_range: float = 0.5,
                       agg: str = "token-mean", denominator: Denominator = None) -> LossOutput:
    """Token-level PPO critic: 0.5 * max((V - G)^2, (V_old + clip(V - V_old, +-eps) - G)^2)."""
    check_shapes(values.shape, old_values=old_values, returns=returns, response_mask=response_mask)
    check_positive(clip_range=clip_range)
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return aggregate(per_token, response_mask, agg, denominator)
