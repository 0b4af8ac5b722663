"""One full SPPO update (critic values, old log-probs, advantages, critic BCE step, policy PPO
steps over two mini-batches x two epochs) with the trainer's own functions at the launched
layout, then a training checkpoint saved and loaded into fresh models.

Reports losses, grad norms, a digest of the updated weights, and whether the reloaded models
and optimizers match.

Usage: torchrun --nproc-per-node N rl_update.py HF_DIR OUT --tp T --pp P
           [--critic-tp T2 --critic-pp P2]   (the critic's own layout; default the policy's)
"""

import argparse

import torch
from common import report

from megatron_sppo.config import load_config
from megatron_sppo.runtime import init_distributed
from megatron_sppo.trainer import rl_step
from megatron_sppo.trainer.checkpointing import (load_training_checkpoint,
                                                 save_training_checkpoint)
from megatron_sppo.trainer.collectives import sum_over_replicas
from megatron_sppo.trainer.models import build_trained_model
from megatron_sppo.trainer.rollout_batch import pad_prompts, pad_rollouts


def synthetic_batch(vocab: int, prompts: int = 8):
    g = torch.Generator().manual_seed(0)
    p_ids = [torch.randint(4, vocab, (int(torch.randint(4, 8, (1,), generator=g)),),
                           generator=g).tolist() for _ in range(prompts)]
    r_ids = [torch.randint(4, vocab, (int(torch.randint(2, 9, (1,), generator=g)),),
                           generator=g).tolist() for _ in range(prompts)]
    logprobs = [(-torch.rand(len(r), generator=g) * 3).tolist() for r in r_ids]
    correct = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0])
    tensors = pad_rollouts(p_ids, r_ids, logprobs)
    cp, cl = pad_prompts(p_ids)
    return rl_step.StepBatch(
        tensors=tensors, group_index=torch.arange(prompts), rewards=correct.clone(),
        correctness=correct, truncated=torch.zeros(prompts, dtype=torch.bool),
        loss_mask=tensors.response_mask, critic_prompt_ids=cp, critic_prompt_lengths=cl)


def digest(model) -> float:
    """A layout-independent fingerprint of the weights: the sum of squares over all shards,
    counting replicated (non-TP) parameters once and one data-parallel replica only."""
    local = torch.zeros(1, dtype=torch.float64)
    first_tp = model.groups.tp_rank == 0
    if model.groups.dp_rank == 0:
        for p in model.module.parameters():
            if getattr(p, "tensor_model_parallel", False) or first_tp:
                local += p.detach().double().pow(2).sum()
    torch.distributed.all_reduce(local)
    return float(local)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--critic-tp", type=int)
    parser.add_argument("--critic-pp", type=int)
    args = parser.parse_args()
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    layout = [f"policy.tensor_model_parallel_size={args.tp}",
              f"policy.pipeline_model_parallel_size={args.pp}",
              f"critic.tensor_model_parallel_size={args.critic_tp or args.tp}",
              f"critic.pipeline_model_parallel_size={args.critic_pp or args.pp}"]
    cfg = load_config(None, [f"policy.checkpoint={args.hf_dir}", "policy.lr=1e-3",
                             "critic.lr=1e-3", "trainer.prompts_per_step=8",
                             "trainer.mini_batch_size=4", "trainer.ppo_epochs=2",
                             f"trainer.max_tokens_per_microbatch={args.max_tokens}",
                             "rollout.temperature=0.8", *layout], world_size=world)
    init_distributed(args.tp, args.pp)
    policy = build_trained_model("policy", cfg.policy, args.hf_dir, 10)
    critic = build_trained_model("critic", cfg.critic, args.hf_dir, 10)
    batch = synthetic_batch(policy.arch.vocab_size)
    bias = rl_step.set_head_bias(critic, batch.correctness.mean().item())
    rl_step.critic_values(critic, batch, cfg)
    batch.old_logprobs = rl_step.forward_logprobs(policy, batch, cfg)
    rl_step.compute_step_advantages(batch, cfg)
    critic_metrics = rl_step.update_critic(critic, batch, cfg, seed=7)
    policy_metrics = rl_step.update_policy(policy, batch, cfg, seed=7)
    models = {"policy": policy, "critic": critic}
    before = {n: digest(m) for n, m in models.items()}
    save_training_checkpoint(args.out, 1, models, {"note": "x"}, keep_last=1)

    fresh = {"policy": build_trained_model("policy", cfg.policy, args.hf_dir, 10),
             "critic": build_trained_model("critic", cfg.critic, args.hf_dir, 10)}
    run = load_training_checkpoint(f"{args.out}/checkpoints/step_0000001", fresh)
    # one more identical update on both: equal results need equal optimizer states too
    outs = []
    for m in (models, fresh):
        outs.append(rl_step.update_policy(m["policy"], batch, cfg, seed=8)["policy_loss"])
    report({"rank": torch.distributed.get_rank(), "critic_loss": critic_metrics["critic_loss"],
            "critic_grad_norm": critic_metrics["critic_grad_norm"], "bias": bias,
            "policy_loss": policy_metrics["policy_loss"],
            "grad_norm": policy_metrics["grad_norm"],
            "clip_fraction": policy_metrics["clip_fraction"],
            "entropy": policy_metrics["entropy"], "digest": before,
            "reloaded_digest": {n: digest(m) for n, m in fresh.items()},
            "after_digest": {n: digest(m) for n, m in models.items()},
            "second_loss": outs, "run_note": run["note"], "run_step": run["step"],
            "lr": fresh["policy"].lr, "critic_logit0": float(batch.critic_logits[0]),
            "replicas": float(sum_over_replicas(torch.ones(1), critic.groups)),
            "critic_layout": [critic.groups.tp_size, critic.groups.pp_size,
                              critic.groups.dp_size],
            "policy_layout": [policy.groups.tp_size, policy.groups.pp_size,
                              policy.groups.dp_size]})


if __name__ == "__main__":
    main()
