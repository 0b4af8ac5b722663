"""torch.distributed + megatron-core model-parallel initialisation for GPU (NCCL) or CPU (gloo).

Works under torchrun/srun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
and in a plain single process, where a one-rank group on a free loopback port is created so
that megatron-core's collectives (and dist_checkpointing) have a process group to use.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_sppo.runtime.cpu import enable_cpu_megatron


HOST_AND_DEVICE = "cpu:gloo,cuda:nccl"


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_to_torch_env() -> None:
    """Map Slurm's per-task variables to torch's when srun starts one task per GPU."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> bool:
    """Initialise torch.distributed and megatron-core's parallel state; seed all RNGs.

    Returns True when running on the relaxed CPU layer. On a GPU (real or emulated) each rank
    takes the GPU of its LOCAL_RANK and the default group is ``"cpu:gloo,cuda:nccl"``: device
    tensors go over NCCL, the trainer's host-side collectives (stop flag, rollouts, per-row
    results) over gloo, since NCCL refuses host tensors. Calling it again with the same sizes
    is a no-op apart from re-seeding; different sizes re-create megatron's groups (the process
    group itself is kept).
    """
    enable_cpu_megatron()  # before megatron-core is imported
    from megatron.core import parallel_state, tensor_parallel

    on_gpu = torch.cuda.is_available()  # a real GPU or the emulated one
    if not dist.is_initialized():
        _slurm_to_torch_env()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        launched = "RANK" in os.environ
        dist.init_process_group(
            backend=HOST_AND_DEVICE if on_gpu else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            # a plain process gets a one-rank group; the environment (inherited by
            # subprocesses) is left untouched
            **({} if launched else dict(init_method=f"tcp://127.0.0.1:{free_port()}",
                                        rank=0, world_size=1)),
        )
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % model_parallel:
        from megatron_sppo.errors import UserError

        raise UserError(
            f"world size {world} is not a multiple of tp*pp={model_parallel}: "
            f"launch a multiple of {model_parallel} ranks or change tp/pp"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size()
            == pipeline_model_parallel_size
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return not on_gpu


def shutdown_distributed() -> None:
    """Collective, after a run's last step: every rank leaves together and the process groups
    are destroyed before interpreter exit (a gloo/NCCL group torn down by static destructors
    can abort the process: "terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
