"""Pure tensor math for SPPO and its baselines: advantage estimators, policy/value losses, KL,
metrics. Imports torch only (no Megatron, no rollout engine, no reward code), so every piece
is unit-tested on CPU against hand-computed cases and independent references."""

from megatron_sppo.algorithms.advantages import (ADVANTAGE_ESTIMATORS, AdvantageBatch,
                                                 AdvantageOutput, check_estimator,
                                                 compute_advantages, register_estimator)
from megatron_sppo.algorithms.checks import AlgorithmInputError
from megatron_sppo.algorithms.kl import KL_ESTIMATORS, kl_from_log_ratio, kl_penalty
from megatron_sppo.algorithms.losses import (AGG_MODES, LossOutput, PolicyLossConfig,
                                             PolicyLossOutput, aggregate, bce_value_loss,
                                             clipped_value_loss, policy_loss)
from megatron_sppo.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten
from megatron_sppo.algorithms.metrics import (critic_calibration, distribution_stats,
                                              policy_metrics, roc_auc)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "KL_ESTIMATORS", "AdvantageBatch", "AdvantageOutput",
    "AlgorithmInputError", "LossOutput", "PolicyLossConfig", "PolicyLossOutput", "aggregate",
    "bce_value_loss", "check_estimator", "clipped_value_loss", "compute_advantages",
    "critic_calibration", "distribution_stats", "kl_from_log_ratio", "kl_penalty",
    "masked_mean", "masked_sum", "masked_var", "masked_whiten", "policy_loss",
    "policy_metrics", "register_estimator", "roc_auc",
]
