"""Verifiable rewards: the math reward (final boxed answer, math-verify), user functions by
``package.module:function`` routed by data_source, scored in a time-limited worker pool."""

from megatron_sppo.rewards.math import extract_answer, math_reward
from megatron_sppo.rewards.pool import PoolResult, WorkerPool
from megatron_sppo.rewards.registry import (RewardConfig, RewardFunctionError, RewardScorer,
                                            Scored, load_reward_function)

__all__ = ["PoolResult", "RewardConfig", "RewardFunctionError", "RewardScorer", "Scored",
           "WorkerPool", "extract_answer", "load_reward_function", "math_reward"]
