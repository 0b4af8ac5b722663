"""SPPO critic updates in megatron-core at the launched TP/PP/DP (BCE on 0/1 correctness,
values at the last prompt token, Megatron optimizer with clipping).

--task random : one update on random prompts/labels; saves the critic for layout comparisons.
--task compare: prompts "AB CD" (two 2-digit numbers, tokenized by the tiny char tokenizer);
                solved iff AB > CD, so the label depends on the content, not on any single
                token. Trains --steps updates and reports held-out BCE and ROC AUC.
Usage: torchrun --nproc-per-node N critic_step.py HF_DIR [--tp T] [--pp P] --task ...
"""

import argparse

import torch
from common import report

from megatron_sppo.algorithms import critic_calibration
from megatron_sppo.checkpoint.convert import model_from_hf
from megatron_sppo.checkpoint.megatron_io import save_model_checkpoint
from megatron_sppo.runtime import init_distributed
from megatron_sppo.trainer.critic_update import (CriticBatch, critic_forward_backward,
                                                 gather_critic_logits)


def random_prompts(vocab: int, n: int, seed: int) -> CriticBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=g)
    return CriticBatch(torch.randint(0, vocab, (n, int(lengths.max())), generator=g), lengths,
                       torch.randint(0, 2, (n,), generator=g).float())


def compare_prompts(tokenizer, n: int, seed: int) -> CriticBatch:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(10, 100, (n,), generator=g), torch.randint(10, 100, (n,), generator=g)
    ids = torch.tensor([tokenizer.encode(f"{x} {y}") for x, y in zip(a.tolist(), b.tolist())])
    return CriticBatch(ids, torch.full((n,), ids.shape[1]), (a > b).float())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--task", choices=("random", "compare"), default="random")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    init_distributed(args.tp, args.pp)
    arch, config, model = model_from_hf(
        args.hf_dir, tp=args.tp, pp=args.pp, critic=True, calculate_per_token_loss=True,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    if args.task == "compare":
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
        make = lambda n, seed: compare_prompts(tokenizer, n, seed)  # noqa: E731
    else:
        make = lambda n, seed: random_prompts(arch.vocab_size, n, seed)  # noqa: E731

    def shard(batch):
        rows = list(range(dp_rank, len(batch.prompt_ids), dp))
        return CriticBatch(batch.prompt_ids[rows], batch.prompt_lengths[rows],
                           batch.correctness[rows])

    def evaluate(batch):
        with torch.no_grad():
            results = critic_forward_backward(ddp, batch, max_tokens=args.max_tokens,
                                              forward_only=True)
        return gather_critic_logits(results, len(batch.prompt_ids)) if results else None

    held_out = make(256, seed=10_000)
    before = evaluate(held_out)
    losses, grad_norm = [], None
    for step in range(args.steps):
        batch = shard(make(16, seed=step))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        results = critic_forward_backward(ddp, batch, max_tokens=args.max_tokens)
        ok, grad_norm, _ = optimizer.step()
        if results:
            totals = torch.tensor([sum(r["loss_sum"].item() for r in results),
                                   sum(r["denominator"].item() for r in results)],
                                  dtype=torch.float64)
            torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
            losses.append((totals[0] / totals[1]).item())
    if args.out:
        save_model_checkpoint(model, args.out, args.steps, arch, args.hf_dir)
    after = evaluate(held_out)
    if after is None:
        return
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    y = held_out.correctness
    calib = critic_calibration(torch.sigmoid(after), y)
    report({"rank": torch.distributed.get_rank(), "first_loss": losses[0],
            "last_loss": losses[-1], "grad_norm": float(grad_norm),
            "heldout_bce_before": bce(before, y).item(), "heldout_bce_after": bce(after, y).item(),
            "heldout_auc": float(calib["critic/auc"]),
            "calibration": {k: float(v) for k, v in calib.items()},
            "values_before": before[:4].tolist(), "values_after": after[:32].tolist()})


if __name__ == "__main__":
    main()
