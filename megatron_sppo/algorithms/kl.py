"""KL estimators from log-probs of sampled tokens (Schulman, "Approximating KL Divergence").

With x = log pi(a) - log pi_ref(a) at a token a sampled from pi, each estimator's mean over
samples estimates KL(pi || pi_ref):
  k1 = x                    unbiased, high variance, can be negative per token
  k2 = x^2 / 2              biased (exact to second order), low variance, >= 0
  k3 = exp(-x) - 1 + x      unbiased, low variance, >= 0  (= r - 1 - log r with r = pi_ref/pi)
  low_var_kl = k3 with x clamped to [-20, 20] and the result to <= 10 (verl's name), so one
               token whose policy has drifted far cannot overflow exp() or dominate the loss.
The same functions serve the KL loss term, the KL-in-reward penalty and the approx-KL metric.
"""

from __future__ import annotations

import torch

from megatron_sppo.algorithms.checks import check_choice

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def kl_from_log_ratio(x: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate from x = log pi - log pi_ref (see the module docstring)."""
    check_choice("KL estimator", estimator, KL_ESTIMATORS)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x**2
    if estimator == "low_var_kl":
        return kl_from_log_ratio(x.clamp(-20, 20), "k3").clamp(max=10)
    return torch.expm1(-x) + x


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens."""
    return kl_from_log_ratio(logprobs - ref_logprobs, estimator)
