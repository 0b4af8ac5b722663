#!/usr/bin/env python
"""Render a Slurm batch script for a training run (megatron_sppo.cluster.slurm).

    python tools/render_slurm.py --job-name sppo --config /lustre/cfg.yaml \\
        --output-dir /lustre/runs/sppo --nodes 2 --tp 2 --dry-run

--dry-run prints the script; otherwise it is written atomically to --out. The layout is
checked first: a bad one prints one ``error:`` line and exits with status 2.
"""

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.cluster.slurm import (PLACEMENTS, SlurmJob, render_sbatch,  # noqa: E402
                                         write_script)
from megatron_sppo.errors import UserError  # noqa: E402
from megatron_sppo.rollout.sglang_launcher import DEFAULT_SGLANG_PYTHON  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Render an sbatch script that runs `megatron-sppo train` under srun + "
                    "torchrun, optionally in a pyxis container, with requeue at the time limit.",
        epilog="Paths must be absolute and identical on every node and inside the container.")
    job = p.add_argument_group("job")
    job.add_argument("--job-name", required=True)
    job.add_argument("--config", required=True, help="trainer YAML config (absolute path)")
    job.add_argument("--output-dir", required=True,
                     help="run directory on the shared filesystem: checkpoints, logs")
    job.add_argument("--time", default="24:00:00", help="Slurm time limit (default 24:00:00)")
    job.add_argument("--partition")
    job.add_argument("--account")
    job.add_argument("--signal-lead", type=int, default=120, metavar="SECONDS",
                     help="SIGUSR1 this long before the time limit; the trainer must finish its "
                          "step and checkpoint in that time (default 120)")
    job.add_argument("--max-requeues", type=int, default=10,
                     help="stop requeueing after this many restarts (default 10)")
    job.add_argument("overrides", nargs="*", metavar="key=value",
                     help="extra trainer config overrides, e.g. trainer.total_steps=500")
    layout = p.add_argument_group("layout")
    layout.add_argument("--nodes", type=int, default=1, help="trainer nodes (default 1)")
    layout.add_argument("--gpus-per-node", type=int, default=8,
                        help="default 8; 0 makes a CPU job: no GPU directives, the local "
                             "rollout engine, one rank per --cpus-per-rank CPUs")
    layout.add_argument("--cpus-per-rank", type=int,
                        help="CPU jobs: CPUs (and threads) per rank (default 1: a rank per CPU)")
    layout.add_argument("--placement", choices=PLACEMENTS, default="colocated")
    layout.add_argument("--rollout-nodes", type=int, default=0,
                        help="SGLang-only nodes (placement disaggregated)")
    layout.add_argument("--tp", type=int, default=1, help="policy (and critic) tensor parallel")
    layout.add_argument("--pp", type=int, default=1, help="policy (and critic) pipeline parallel")
    layout.add_argument("--rdzv-port", type=int, default=29500)
    sglang = p.add_argument_group("SGLang")
    sglang.add_argument("--sglang-tp", type=int, default=1)
    sglang.add_argument("--sglang-model",
                        help="HF directory the disaggregated servers start from")
    sglang.add_argument("--sglang-port", type=int, default=30000, help="first server's port")
    sglang.add_argument("--sglang-python", default=DEFAULT_SGLANG_PYTHON)
    sglang.add_argument("--sglang-mem-fraction", type=float, default=0.85,
                        help="--mem-fraction-static of disaggregated servers (default 0.85)")
    sglang.add_argument("--sglang-args", default="",
                        help='extra server flags in one string, e.g. "--kv-cache-dtype fp8_e5m2"')
    env = p.add_argument_group("container and network")
    env.add_argument("--container-image", help="pyxis image, e.g. nvcr.io#nvidia/pytorch:25.10-py3 "
                                               "or a .sqsh file")
    env.add_argument("--container-mounts", default="",
                     help="comma-separated SRC:DST mounts, e.g. /lustre:/lustre")
    env.add_argument("--nccl-socket-ifname", help="NCCL_SOCKET_IFNAME, e.g. ib0 or ^lo,docker0")
    env.add_argument("--nccl-ib-hca", help="NCCL_IB_HCA, e.g. mlx5_0,mlx5_1")
    out = p.add_argument_group("output")
    out.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    out.add_argument("-o", "--out", help="where to write the script (not with --dry-run)")
    return p


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    return SlurmJob(
        job_name=args.job_name, config=args.config, output_dir=args.output_dir,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, placement=args.placement,
        rollout_nodes=args.rollout_nodes, policy_tp=args.tp, policy_pp=args.pp,
        sglang_tp=args.sglang_tp, sglang_model=args.sglang_model, sglang_port=args.sglang_port,
        sglang_python=args.sglang_python, sglang_mem_fraction=args.sglang_mem_fraction,
        sglang_args=tuple(shlex.split(args.sglang_args)), time_limit=args.time,
        partition=args.partition, account=args.account, container_image=args.container_image,
        container_mounts=tuple(m for m in args.container_mounts.split(",") if m),
        rdzv_port=args.rdzv_port, signal_lead_s=args.signal_lead,
        max_requeues=args.max_requeues, nccl_socket_ifname=args.nccl_socket_ifname,
        nccl_ib_hca=args.nccl_ib_hca, overrides=tuple(args.overrides),
        cpus_per_rank=args.cpus_per_rank)


def job_arguments(argv: list[str]) -> list[str]:
    """``argv`` without the output options: what the script header records."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-o", "--out"):
            skip = True
        elif arg != "--dry-run" and not arg.startswith(("--out=", "-o")):
            kept.append(arg)
    return kept


def run(args: argparse.Namespace) -> None:
    if not args.dry_run and not args.out:
        raise UserError("give --out FILE to write the script, or --dry-run to print it")
    rendered_by = shlex.join(["tools/render_slurm.py", *job_arguments(args.argv)])
    script = render_sbatch(job_from_args(args), rendered_by)
    if args.dry_run:
        sys.stdout.write(script)
        return
    path = write_script(args.out, script)
    print(f"wrote {path}; submit with: mkdir -p {shlex.quote(args.output_dir)} && sbatch {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_tool(run, args)


if __name__ == "__main__":
    sys.exit(main())
