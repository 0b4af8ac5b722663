"""Process-group rules under the emulated accelerator, on 2 ranks (torchrun).

Usage: MEGATRON_SPPO_EMULATE_GPU=1 torchrun --nproc-per-node 2 emulated_groups.py CASE
CASE: nccl (default group "nccl"), mixed ("cpu:gloo,cuda:nccl"), same_gpu (both ranks on
GPU 0 of an NCCL group). Prints one RESULT per rank: what each collective did.
"""

import sys

import torch
import torch.distributed as dist
from common import report

from megatron_sppo.runtime.distributed import HOST_AND_DEVICE


def attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except RuntimeError as e:
        return str(e)


def main():
    case = sys.argv[1]
    rank = int(__import__("os").environ["RANK"])
    torch.cuda.set_device(0 if case == "same_gpu" else rank)
    dist.init_process_group("nccl" if case in ("nccl", "same_gpu") else HOST_AND_DEVICE)
    out = {"rank": rank, "backend": str(dist.get_backend())}
    device = torch.ones(2, device="cuda") * (rank + 1)
    out["device_all_reduce"] = attempt(lambda: dist.all_reduce(device))
    out["device_sum"] = device.tolist()
    if case != "same_gpu":
        host = torch.ones(2) * (rank + 1)
        out["host_all_reduce"] = attempt(lambda: dist.all_reduce(host))
        box = [{"from": rank}] if rank == 0 else [None]
        out["broadcast_object"] = attempt(lambda: dist.broadcast_object_list(box, src=0))
        out["object"] = box[0]
        sub = dist.new_group([0, 1])  # inherits the default group's backend
        out["subgroup_backend"] = str(dist.get_backend(sub))
    report(out)


if __name__ == "__main__":
    main()
