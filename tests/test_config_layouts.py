"""Policy and critic layouts are checked up front, each against the launched ranks: a critic
may take its own TP/PP (its own process groups on the same ranks), and what cannot run is
one error naming the key."""

from __future__ import annotations

import pytest

from megatron_sppo.config import load_config
from megatron_sppo.errors import UserError

BASE = ["policy.checkpoint=/nonexistent/ok-for-config-checks", "trainer.prompts_per_step=8"]


def layout(policy_tp=1, policy_pp=1, critic_tp=1, critic_pp=1) -> list[str]:
    return [f"policy.tensor_model_parallel_size={policy_tp}",
            f"policy.pipeline_model_parallel_size={policy_pp}",
            f"critic.tensor_model_parallel_size={critic_tp}",
            f"critic.pipeline_model_parallel_size={critic_pp}"]


def test_critic_may_take_its_own_layout():
    cfg = load_config(None, [*BASE, *layout(policy_tp=2, critic_tp=1)], world_size=2)
    assert cfg.policy.tensor_model_parallel_size == 2
    assert cfg.critic.tensor_model_parallel_size == 1


@pytest.mark.parametrize("overrides, message", [
    (layout(policy_tp=2, critic_tp=4), "critic.tensor_model_parallel_size x "
                                       "critic.pipeline_model_parallel_size = 4 does not divide "
                                       "the 2 launched ranks"),
    # 8 prompts over a critic data-parallel size of 16 ranks / 1
    (layout(policy_tp=4, policy_pp=4, critic_tp=1) + ["trainer.prompts_per_step=8"],
     "critic data-parallel size 16 does not divide the mini-batch of 8 sequences"),
    (layout(policy_tp=2, critic_tp=1) + ["critic.fp8.format=e4m3"],
     "critic.fp8.format needs the critic at the policy's tensor/pipeline sizes"),
])
def test_impossible_layouts_name_the_key(overrides, message):
    world = 16 if "policy.pipeline_model_parallel_size=4" in overrides else 2
    with pytest.raises(UserError) as err:
        load_config(None, [*BASE, *overrides], world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_critic_layout_is_ignored_without_a_critic():
    cfg = load_config(None, [*BASE, *layout(critic_tp=3), "algorithm.estimator=grpo",
                             "rollout.n=2"], world_size=2)
    assert cfg.critic.tensor_model_parallel_size == 3
