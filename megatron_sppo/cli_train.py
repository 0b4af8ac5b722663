"""The training commands of `megatron-sppo`: train, sft, demo, eval (see cli.py for convert).

Launch with torchrun or srun for several ranks; a plain process runs one rank.
"""

from __future__ import annotations

import argparse
import os


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def run_train(args: argparse.Namespace) -> None:
    from megatron_sppo.config import load_config
    from megatron_sppo.quant.fp8_train import check_fp8_runtime

    cfg = load_config(args.config, args.overrides, world_size=_world_size())
    check_fp8_runtime({"policy": cfg.policy.fp8,
                       **({"critic": cfg.critic.fp8} if cfg.algorithm.needs_critic else {})})
    from megatron_sppo.runtime.distributed import shutdown_distributed
    from megatron_sppo.trainer.loop import train  # megatron-core is imported from here on

    out = train(cfg, resume=args.resume)
    shutdown_distributed()
    if _is_rank0():
        print(f"outputs: {out}")


def run_sft_command(args: argparse.Namespace) -> None:
    from megatron_sppo.runtime.distributed import shutdown_distributed
    from megatron_sppo.trainer.sft import SFTConfig, run_sft

    path = run_sft(SFTConfig(model=args.model, data=args.data, output=args.output,
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                             adam_beta2=args.adam_beta2, tp=args.tp,
                             pp=args.pp, max_tokens=args.max_tokens, seed=args.seed,
                             progress=not args.no_progress))
    shutdown_distributed()
    if _is_rank0():
        print(f"wrote {path}")


def run_demo_command(args: argparse.Namespace) -> None:
    from megatron_sppo.demo.run import run_demo

    run_demo(args.output_dir, args.config, tuple(args.overrides))


def add_train_commands(commands) -> None:
    train = commands.add_parser(
        "train", help="RL training (SPPO and baselines) from a YAML config",
        description="Run RL training: prompts -> critic values -> rollouts -> rewards -> "
                    "advantages -> critic update -> policy update -> weight sync. Launch "
                    "under torchrun/srun for several ranks.",
        epilog="example: megatron-sppo train --config examples/configs/tiny_cpu_sppo.yaml "
               "trainer.total_steps=20 trainer.output_dir=outputs/try")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="'auto': continue from the latest complete checkpoint in "
                            "trainer.output_dir (fresh start if there is none); or a "
                            "checkpoint directory")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. algorithm.estimator=grpo rollout.n=8")
    train.set_defaults(func=run_train)

    sft = commands.add_parser(
        "sft", help="supervised warm start on prompt/response JSONL",
        description="Supervised fine-tuning with megatron-core: token-mean NLL of the response "
                    "tokens; writes a Megatron checkpoint that `train` starts from.")
    sft.add_argument("--model", required=True, help="HF model directory or Megatron checkpoint")
    sft.add_argument("--data", required=True,
                     help="JSONL with one {\"prompt\": ..., \"response\": ...} per line")
    sft.add_argument("--output", required=True, help="output Megatron checkpoint root")
    sft.add_argument("--steps", type=int, default=200)
    sft.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    sft.add_argument("--lr", type=float, default=1e-3, help="peak LR (cosine decay)")
    sft.add_argument("--min-lr", type=float, default=1e-4)
    sft.add_argument("--warmup-steps", type=int, default=10)
    sft.add_argument("--adam-beta2", type=float, default=0.999,
                     help="Adam beta2 (0.98 suits short runs at a high LR)")
    sft.add_argument("--tp", type=int, default=1)
    sft.add_argument("--pp", type=int, default=1)
    sft.add_argument("--max-tokens", type=int, default=4096,
                     help="token budget of one micro-batch")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--no-progress", action="store_true")
    sft.set_defaults(func=run_sft_command)

    demo = commands.add_parser(
        "demo", help="the CPU demo: SPPO on a tiny model vs a shuffled-reward control",
        description="Build (once, cached) a tiny warm-started policy on the built-in arithmetic "
                    "task, run SPPO with the local engine and the same run with shuffled "
                    "rewards, evaluate both on held-out problems, and write summary.json, "
                    "summary.md and learning_curve.png into --output-dir.",
        epilog="example: megatron-sppo demo --output-dir outputs/demo trainer.total_steps=40")
    demo.add_argument("--output-dir", required=True, help="where both runs and the summary go")
    demo.add_argument("--config", help="RL config (default: examples/configs/tiny_cpu_sppo.yaml)")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="overrides applied to both runs, e.g. trainer.total_steps=40")
    demo.set_defaults(func=run_demo_command)
