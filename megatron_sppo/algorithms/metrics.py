"""Training diagnostics on plain tensors: PPO health, distribution statistics, critic calibration.

Each function returns ``{name: 0-dim tensor}`` (detached), so a caller can all-reduce them
across ranks before logging. Means use the same masked machinery as the losses.
"""

from __future__ import annotations

import torch

from megatron_sppo.algorithms.checks import AlgorithmInputError, check_binary, check_shapes
from megatron_sppo.algorithms.kl import kl_from_log_ratio
from megatron_sppo.algorithms.losses import PolicyLossOutput
from megatron_sppo.algorithms.masked import masked_mean, masked_var


@torch.no_grad()
def policy_metrics(out: PolicyLossOutput, response_mask: torch.Tensor,
                   entropy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Clip fractions, approximate KL(pi_old || pi) and entropy over the response tokens.

    approx_kl_k3 = mean(r - 1 - log r), r = pi / pi_old: unbiased for samples from pi_old.
    approx_kl_k2 = mean(0.5 * (log r)^2): the older, biased form many PPO codes log.
    """
    mask = response_mask.bool()

    def frac(flag: torch.Tensor) -> torch.Tensor:
        return masked_mean(flag.float(), mask)

    metrics = {
        "policy/clipfrac_low": frac(out.clipped_low),
        "policy/clipfrac_high": frac(out.clipped_high),
        "policy/clipfrac": frac(out.clipped_low | out.clipped_high),
        "policy/dual_clipfrac": frac(out.dual_clipped),
        "policy/approx_kl_k3": masked_mean(kl_from_log_ratio(-out.log_ratio, "k3"), mask),
        "policy/approx_kl_k2": masked_mean(kl_from_log_ratio(out.log_ratio, "k2"), mask),
    }
    if entropy is not None:
        metrics["policy/entropy"] = masked_mean(entropy, mask)
    return metrics


@torch.no_grad()
def distribution_stats(x: torch.Tensor, mask: torch.Tensor | None = None,
                       prefix: str = "x") -> dict[str, torch.Tensor]:
    """mean/std/min/max of x over the masked entries; for x [B, T] also the same statistics
    of the per-sequence means (under ``{prefix}/seq``), since long responses dominate the
    token statistics. std is unbiased; an empty mask gives NaN min/max."""
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    check_shapes(x.shape, mask=mask)
    values = x[mask]
    nan = x.new_tensor(float("nan"))
    stats = {f"{prefix}/mean": masked_mean(x, mask), f"{prefix}/std": masked_var(x, mask).sqrt(),
             f"{prefix}/min": values.min() if values.numel() else nan,
             f"{prefix}/max": values.max() if values.numel() else nan}
    if x.dim() == 2:
        stats.update(distribution_stats(masked_mean(x, mask, -1), mask.any(-1), f"{prefix}/seq"))
    return stats


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """P(score of a random positive > score of a random negative), ties counting 1/2:
    the Mann-Whitney U / (n_pos n_neg) from average ranks. NaN if one class is absent."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct score: (scores below it) + (its count + 1) / 2
    rank = ((counts.cumsum(0) - counts) + (counts + 1) / 2)[inverse].double()
    positive = labels.bool()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return scores.new_tensor(float("nan"))
    u = rank[positive].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).to(scores.dtype)


@torch.no_grad()
def critic_calibration(predicted: torch.Tensor, correctness: torch.Tensor,
                       n_bins: int = 10) -> dict[str, torch.Tensor]:
    """How well the SPPO critic's V = sigmoid(f) predicts the 0/1 outcome.

    brier = mean((V - y)^2); ece = sum_b (n_b / N) |mean_b V - mean_b y| over n_bins
    equal-width bins [k/n, (k+1)/n) (V = 1 in the last); mean predicted vs empirical success;
    auc = roc_auc(V, y), the critic's power to tell solvable prompts from unsolvable ones.
    """
    check_shapes(predicted.shape, correctness=correctness)
    check_binary("correctness", correctness)
    if n_bins < 1:
        raise AlgorithmInputError(f"n_bins={n_bins} must be >= 1")
    if predicted.numel() and (predicted.min() < 0 or predicted.max() > 1):
        raise AlgorithmInputError("predicted must be probabilities in [0, 1]: pass "
                                  "sigmoid(critic_logits), not the logits")
    y = correctness.to(predicted.dtype)
    bins = (predicted * n_bins).long().clamp(max=n_bins - 1)
    # n_b / N * |mean_b V - mean_b y| = |sum_b V - sum_b y| / N
    gap = predicted.new_zeros(n_bins).index_add_(0, bins, predicted - y).abs()
    return {"critic/brier": ((predicted - y) ** 2).mean(),
            "critic/ece": gap.sum() / max(len(y), 1),
            "critic/mean_predicted": predicted.mean(),
            "critic/mean_success": y.mean(),
            "critic/auc": roc_auc(predicted, y)}
