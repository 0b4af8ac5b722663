"""Verifiable rewards: the math reward (boxed answer, math-verify), the demo's arithmetic
check, user functions by ``package.module:function``, scored in a time-limited pool."""

from megatron_sppo.rewards.math import extract_answer, math_reward
from megatron_sppo.rewards.scorer import RewardScorer, Scored, load_reward_function

__all__ = ["RewardScorer", "Scored", "extract_answer", "load_reward_function", "math_reward"]
