"""The prompt-selection pool's critic forward (rl_step.prompt_critic_logits over a pool of
prompts, micro-batched by a small token budget) at the launched critic layout, against
(a) the step's critic values (rl_step.critic_values on a step batch holding some of the same
prompts, two samples each, micro-batched differently) and (b) plain PyTorch: the HF model's
final hidden state at each prompt's last token @ w + b, one prompt at a time.

Usage: torchrun --nproc-per-node N critic_pool.py HF_DIR --tp T
"""

import argparse

import torch
from common import report

from megatron_sppo.config import load_config
from megatron_sppo.runtime import init_distributed
from megatron_sppo.trainer import rl_step
from megatron_sppo.trainer.models import build_trained_model
from megatron_sppo.trainer.rollout_batch import pad_prompts

BIAS = -0.4
CHOSEN = [1, 4, 6, 9]


def head_weight(hidden: int) -> torch.Tensor:
    return torch.randn(1, hidden, generator=torch.Generator().manual_seed(3)) * 0.2


def pool_prompts(vocab: int, n: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (int(torch.randint(3, 10, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [f"policy.checkpoint={args.hf_dir}",
                             f"policy.tensor_model_parallel_size={args.tp}",
                             f"critic.tensor_model_parallel_size={args.tp}",
                             "trainer.max_tokens_per_microbatch=20",
                             "trainer.prompts_per_step=4", "algorithm.prompt_selection=true"],
                      world_size=world)
    init_distributed(args.tp, 1)
    critic = build_trained_model("critic", cfg.critic, args.hf_dir, 10)
    head = critic.module.output_layer
    with torch.no_grad():
        head.weight.copy_(head_weight(critic.arch.hidden_size))
        head.bias.fill_(BIAS)
    prompts = pool_prompts(critic.arch.vocab_size)
    ids, lengths = pad_prompts(prompts)
    pool = rl_step.prompt_critic_logits(critic, ids, lengths, cfg)

    group = torch.tensor(CHOSEN).repeat_interleave(2)
    step_ids, step_lengths = pad_prompts([prompts[i] for i in group.tolist()])
    batch = rl_step.StepBatch(
        tensors=None, group_index=torch.arange(len(CHOSEN)).repeat_interleave(2),
        rewards=torch.zeros(len(group)), correctness=torch.zeros(len(group)),
        truncated=torch.zeros(len(group), dtype=torch.bool), loss_mask=None,
        critic_prompt_ids=step_ids, critic_prompt_lengths=step_lengths)
    rl_step.critic_values(critic, batch, cfg)

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = torch.stack([
            (hf.model(torch.tensor([p])).last_hidden_state[0, -1]
             @ head_weight(critic.arch.hidden_size).T + BIAS)[0] for p in prompts])
    report({"rank": torch.distributed.get_rank(), "tp": critic.groups.tp_size,
            "pool": pool.tolist(),
            "step_diff": (pool[group] - batch.critic_logits).abs().max().item(),
            "reference_diff": (pool - reference).abs().max().item(),
            "spread": pool.std().item()})


if __name__ == "__main__":
    main()
