"""The single-update shortcuts of trainer/rl_step.py against the forward passes they replace,
at the launched layout: SPPO's pre-update critic values taken from the critic update's own
forward, and the policy's old log-probs from the policy update's own forward, against
critic_values() and forward_logprobs() run before the updates. Both paths start from freshly
built identical models; the script reports the largest differences of values, advantages,
old log-probs, losses, grad norms, gradients (DDP main_grad) and updated weights.

Usage: torchrun --nproc-per-node N update_shortcuts.py HF_DIR [--pp P]
           [--critic-tp T --critic-pp P]   (the critic's own layout; default the policy's)
"""

import argparse
import os

import torch
from common import report
from rl_update import synthetic_batch

from megatron_sppo.config import load_config
from megatron_sppo.runtime import init_distributed
from megatron_sppo.trainer import rl_step
from megatron_sppo.trainer.models import build_trained_model


def one_step(cfg, hf_dir: str, shortcut: bool) -> dict:
    policy = build_trained_model("policy", cfg.policy, hf_dir, 10)
    critic = build_trained_model("critic", cfg.critic, hf_dir, 10)
    start = [p.detach().clone() for p in policy.module.parameters()]
    batch = synthetic_batch(policy.arch.vocab_size)
    rl_step.set_head_bias(critic, batch.correctness.mean().item())
    assert rl_step.critic_values_from_update(batch, cfg)
    assert rl_step.old_logprobs_from_update(batch, cfg)
    if shortcut:  # as the loop runs a single update
        critic_metrics = rl_step.update_critic(critic, batch, cfg, seed=7)
    else:
        rl_step.critic_values(critic, batch, cfg)
        batch.old_logprobs = rl_step.forward_logprobs(policy, batch, cfg)
    rl_step.compute_step_advantages(batch, cfg)
    if not shortcut:
        critic_metrics = rl_step.update_critic(critic, batch, cfg, seed=7)
    policy_metrics = rl_step.update_policy(policy, batch, cfg, seed=7)
    return {"batch": batch, "critic": critic_metrics, "policy": policy_metrics,
            "moved": max((p.detach() - s).abs().max().item()
                         for p, s in zip(policy.module.parameters(), start)),
            **{f"{name}_{what}": [getattr(p, attr).detach().clone()
                                  for p in model.module.parameters()]
               for name, model in (("policy", policy), ("critic", critic))
               for what, attr in (("grads", "main_grad"), ("weights", "data"))}}


def largest(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--critic-tp", type=int, default=1)
    parser.add_argument("--critic-pp", type=int)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [f"policy.checkpoint={args.hf_dir}", "policy.lr=1e-3",
                             "critic.lr=1e-3", "trainer.prompts_per_step=8",
                             "trainer.max_tokens_per_microbatch=32", "rollout.temperature=0.8",
                             f"policy.pipeline_model_parallel_size={args.pp}",
                             f"critic.tensor_model_parallel_size={args.critic_tp}",
                             f"critic.pipeline_model_parallel_size={args.critic_pp or args.pp}"],
                      world_size=world)
    init_distributed(1, args.pp)
    ref, fast = one_step(cfg, args.hf_dir, False), one_step(cfg, args.hf_dir, True)
    out = {"rank": torch.distributed.get_rank(), "moved": ref["moved"]}
    for key in ("critic_logits", "advantages", "old_logprobs"):
        out[key] = (getattr(ref["batch"], key) - getattr(fast["batch"], key)).abs().max().item()
    for part, keys in (("critic", ("critic_loss", "critic_grad_norm")),
                       ("policy", ("policy_loss", "grad_norm", "clip_fraction"))):
        for key in keys:
            out[key] = [ref[part][key], fast[part][key]]
    for key in ("policy_grads", "policy_weights", "critic_grads", "critic_weights"):
        out[key] = largest(ref[key], fast[key])
    report(out)


if __name__ == "__main__":
    main()
