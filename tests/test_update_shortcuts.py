"""A single update (one PPO epoch, one mini-batch) takes the pre-update values from its own
forward: SPPO's critic values from the critic update's forward and the policy's old log-probs
from the policy update's forward. With and without these shortcuts the values, advantages,
losses, grad norms, gradients and updated weights are the same bit for bit (policy at PP=2,
critic at DP=2 on the same two ranks), and the shortcuts are taken exactly when they apply
(the critic's own mini-batch size, critic.mini_batch_size, counts for its values)."""

import pytest
from helpers import torchrun


def test_shortcuts_change_nothing(zoo):
    results = torchrun("update_shortcuts.py", 2, zoo["qwen2_gqa_untied"], "--pp", "2",
                       "--critic-pp", "1")
    assert len(results) == 2
    for r in results:
        assert r["moved"] > 1e-4, "the update must change the policy"
        for key in ("critic_logits", "advantages", "old_logprobs", "policy_grads",
                    "policy_weights", "critic_grads", "critic_weights"):
            assert r[key] == 0.0, (key, r)
        for key in ("critic_loss", "critic_grad_norm", "policy_loss", "grad_norm",
                    "clip_fraction"):
            assert r[key][0] == r[key][1], (key, r)


@pytest.mark.parametrize("overrides, critic, policy", [
    ([], True, True),
    (["trainer.ppo_epochs=2"], False, False),
    (["trainer.mini_batch_size=2"], False, False),
    (["algorithm.kl_in_reward=0.001"], True, False),  # the advantage needs the log-probs
    (["algorithm.old_logprobs=engine"], True, False),  # the engine's are used, no forward
    (["algorithm.estimator=grpo", "rollout.n=2"], False, True),  # no SPPO critic
    (["trainer.mini_batch_size=2", "critic.mini_batch_size=4"], True, False),  # verl-style
])
def test_shortcuts_apply_only_to_a_single_update(zoo, overrides, critic, policy):
    import torch

    from megatron_sppo.config import load_config
    from megatron_sppo.trainer import rl_step

    cfg = load_config(None, [f"policy.checkpoint={zoo['qwen2_gqa_untied']}",
                             "trainer.prompts_per_step=4", *overrides])
    n = cfg.rollout.n
    batch = rl_step.StepBatch(tensors=None, group_index=torch.arange(4).repeat_interleave(n),
                              rewards=torch.zeros(4 * n), correctness=torch.zeros(4 * n),
                              truncated=torch.zeros(4 * n, dtype=torch.bool), loss_mask=None)
    assert rl_step.critic_values_from_update(batch, cfg) == critic
    assert rl_step.old_logprobs_from_update(batch, cfg) == policy


def test_critic_mini_batch_must_divide_the_batch(zoo):
    from megatron_sppo.config import load_config
    from megatron_sppo.errors import UserError

    with pytest.raises(UserError, match="critic.mini_batch_size=3 must divide"):
        load_config(None, [f"policy.checkpoint={zoo['qwen2_gqa_untied']}",
                           "trainer.prompts_per_step=4", "critic.mini_batch_size=3"])
