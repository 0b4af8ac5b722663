"""One SPPO policy update in megatron-core at the launched TP/PP/DP, from a tiny HF model:
old log-probs from a forward-only pass, then the clipped loss through the schedule with
token-budget micro-batches, DDP and the Megatron optimizer with clipping. Saves the updated
policy so the test can compare layouts and micro-batchings.

Usage: torchrun --nproc-per-node N ppo_step.py HF_DIR --tp T --pp P --out DIR --max-tokens M
"""

import argparse

import torch
from common import report

from megatron_sppo.algorithms import AdvantageBatch, PolicyLossConfig, compute_advantages
from megatron_sppo.checkpoint.convert import model_from_hf
from megatron_sppo.checkpoint.megatron_io import save_model_checkpoint
from megatron_sppo.runtime import init_distributed
from megatron_sppo.trainer.policy_update import PolicyBatch, gather_logprobs
from megatron_sppo.data.packing import SequenceLayout
from megatron_sppo.trainer.policy_update import policy_forward_backward

TEMPERATURE = 0.8


def synthetic_rollouts(vocab: int, n: int = 8):
    """Prompts of 4-6 tokens + responses of 3-9 tokens, right-padded; SPPO advantages."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 7, (n,), generator=g)
    response = torch.randint(3, 10, (n,), generator=g)
    lengths = prompt + response
    ids = torch.randint(0, vocab, (n, int(lengths.max())), generator=g)
    cols = torch.arange(ids.shape[1] - 1)
    # position t predicts token t+1: a response token when prompt <= t+1 < length
    mask = (cols >= prompt[:, None] - 1) & (cols < lengths[:, None] - 1)
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    critic_logits = torch.randn(n, generator=g)
    adv = compute_advantages("sppo", AdvantageBatch(rewards, mask, critic_logits=critic_logits))
    noise = 0.3 * torch.randn(mask.shape, generator=g)  # an off-policy gap, so clipping fires
    return ids, lengths, mask, adv.advantages, noise


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--align", type=int, default=1,
                        help="pad micro-batch widths to a multiple (FP8 / sequence parallel)")
    args = parser.parse_args()

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    init_distributed(args.tp, args.pp)
    arch, config, model = model_from_hf(
        args.hf_dir, tp=args.tp, pp=args.pp, calculate_per_token_loss=True,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=0.5), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    ids, lengths, mask, advantages, noise = synthetic_rollouts(arch.vocab_size)
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    rows = list(range(dp_rank, len(ids), dp))  # this data-parallel rank's share
    batch = PolicyBatch(ids[rows], lengths[rows], mask[rows])
    kwargs = dict(vocab_size=arch.vocab_size, temperature=TEMPERATURE, max_tokens=args.max_tokens,
                  layout=SequenceLayout(align=args.align))
    with torch.no_grad():
        old = policy_forward_backward(ddp, batch, forward_only=True, **kwargs)
    last_stage = parallel_state.is_pipeline_last_stage()
    if last_stage:
        batch.old_logprobs = gather_logprobs(old, batch) + noise[rows]
    else:  # only the last stage computes the loss; other stages never read these
        batch.old_logprobs = torch.zeros(mask[rows].shape)
    batch.advantages = advantages[rows]

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    results = policy_forward_backward(ddp, batch, loss_cfg=PolicyLossConfig(), **kwargs)
    ok, grad_norm, _ = optimizer.step()
    save_model_checkpoint(model, args.out, 1, arch, args.hf_dir)
    if last_stage:
        totals = torch.tensor([sum(r["loss_sum"].item() for r in results),
                               sum(r["denominator"].item() for r in results)], dtype=torch.float64)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        report({"rank": torch.distributed.get_rank(), "ok": bool(ok),
                "grad_norm": float(grad_norm), "loss": (totals[0] / totals[1]).item(),
                "tokens": int(totals[1]), "microbatches": len(results)})


if __name__ == "__main__":
    main()
