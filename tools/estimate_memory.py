#!/usr/bin/env python
"""Estimate memory per GPU of a training layout (megatron_sppo.cluster.memory).

    python tools/estimate_memory.py --policy R1-Distill-Qwen-7B --critic R1-Distill-Qwen-1.5B \\
        --gpus 8 --tp 2 --micro-batch-tokens 9216 --sglang-mem-fraction 0.5

Prints a table and whether the peak fits; exit status 0 if it fits, 1 if not, 2 on bad input.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.cluster.memory import (PRESETS, Layout, estimate, format_table,  # noqa: E402
                                          load_arch, model_memory)
from megatron_sppo.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Estimate memory per GPU for policy (+ critic, + reference) training with "
                    "megatron-core, and colocated SGLang.",
        epilog=f"Presets: {', '.join(PRESETS)}. A model may also be an HF directory or a "
               "config.json path.")
    p.add_argument("--policy", required=True, help="preset, HF directory or config.json")
    p.add_argument("--critic", help="critic model (SPPO/PPO); omit for critic-free estimators")
    p.add_argument("--reference", action="store_true",
                   help="add a frozen bf16 reference policy (KL terms)")
    p.add_argument("--gpus", type=int, default=8, help="trainer GPUs in all (default 8)")
    p.add_argument("--tp", type=int, default=1, help="policy tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="policy pipeline parallel size")
    p.add_argument("--critic-tp", type=int, help="default: the policy's")
    p.add_argument("--critic-pp", type=int, help="default: the policy's")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard Adam states and master weights over data parallel ranks")
    p.add_argument("--full-recompute", action="store_true",
                   help="recompute every layer in backward (keep only layer inputs)")
    p.add_argument("--optimizer-offload", action="store_true", help="Adam states on the CPU")
    p.add_argument("--micro-batch-tokens", type=int, default=4096,
                   help="tokens per policy micro-batch, padding included "
                        "(trainer.max_tokens_per_microbatch; default 4096)")
    p.add_argument("--critic-micro-batch-tokens", type=int,
                   help="tokens per critic micro-batch (SPPO's critic reads prompts only); "
                        "default: --micro-batch-tokens")
    p.add_argument("--sglang-mem-fraction", type=float,
                   help="colocated SGLang's mem-fraction-static (omit if not colocated)")
    p.add_argument("--sglang-not-released", action="store_true",
                   help="SGLang keeps its memory during training (no memory saver)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="default 80 (H100)")
    p.add_argument("--overhead-gib", type=float, default=3.0,
                   help="CUDA context, NCCL buffers, allocator slack (default 3)")
    return p


def _layout(args, tp: int, pp: int) -> Layout:
    if tp < 1 or pp < 1 or args.gpus % (tp * pp):
        raise UserError(f"tp x pp = {tp} x {pp} does not divide --gpus {args.gpus}")
    return Layout(tp=tp, pp=pp, dp=args.gpus // (tp * pp),
                  sequence_parallel=args.sequence_parallel,
                  distributed_optimizer=args.distributed_optimizer,
                  full_recompute=args.full_recompute, optimizer_offload=args.optimizer_offload)


def run(args: argparse.Namespace) -> None:
    if args.micro_batch_tokens < 1 or (args.critic_micro_batch_tokens or 1) < 1:
        raise UserError("micro-batch tokens must be >= 1")
    policy_layout = _layout(args, args.tp, args.pp)
    policy = load_arch(args.policy)
    models = [model_memory("policy", policy, policy_layout, args.micro_batch_tokens)]
    if args.critic:
        critic_layout = _layout(args, args.critic_tp or args.tp, args.critic_pp or args.pp)
        models.append(model_memory("critic", load_arch(args.critic), critic_layout,
                                   args.critic_micro_batch_tokens or args.micro_batch_tokens,
                                   scalar_head=True))
    if args.reference:
        models.append(model_memory("reference", policy, policy_layout, 0, trained=False))
    est = estimate(models, sglang_fraction=args.sglang_mem_fraction,
                   sglang_released=not args.sglang_not_released, gpu_gib=args.gpu_memory_gib,
                   overhead_gib=args.overhead_gib)
    print(f"policy {args.policy}: {args.gpus} GPUs, tp {policy_layout.tp}, pp {policy_layout.pp}, "
          f"dp {policy_layout.dp}; micro-batch {args.micro_batch_tokens} tokens")
    print(format_table(est))
    args.fits = est.fits


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = run_tool(run, args)
    return status if status else (0 if args.fits else 1)


if __name__ == "__main__":
    sys.exit(main())
