"""Policy weights -> the rollout engine, for each placement.

* Local engine, SGLang on its own GPUs (NCCL broadcast): the first data-parallel replica's
  model-parallel ranks export collectively (TP all-gathers, PP broadcasts) and global rank 0
  hands the full tensors to the engine.
* SGLang colocated with the trainer (CUDA IPC): every server TP rank reads its own entry of
  ``serialized_named_tensors``, and a CUDA-IPC handle only opens on the node that made it, so
  the trainer rank on each server GPU supplies that TP rank's entry (a GPU without a trainer
  rank gets rank 0's, opened across GPUs). Every data-parallel replica holding such a rank
  exports (each rank of it yields the whole model), the replicas in parallel; rank 0 gathers
  the entries and posts each server's calls (:class:`~megatron_sppo.rollout.sglang_weights.
  TensorSync`). NCCL cannot serve this placement: a trainer rank and a server rank on one GPU
  cannot be in one communicator.

Ranks are matched to server GPUs by device UUID (``torch.cuda.get_device_properties``), which
holds whatever CUDA_VISIBLE_DEVICES each process has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sppo.trainer.collectives import broadcast_object


@dataclass
class WeightSync:
    """This rank's part of a sync: ``exports`` whether it takes part in the export;
    ``engine`` on global rank 0; ``tensor_sync`` on the other ranks supplying IPC entries."""

    engine: object | None
    exports: bool
    tensor_sync: object | None = None
    payload: str = "bf16"
    bucket_bytes: int = 0

    def push(self, policy, version: int) -> None:
        from megatron_sppo.rollout.export import iter_hf_tensors_live

        if not self.exports:
            return
        named = iter_hf_tensors_live(policy.module, policy.arch, gather_pipeline=True)
        if self.engine is not None:
            self.engine.update_weights(named, version)
        elif self.tensor_sync is not None:
            from megatron_sppo.rollout.sglang_engine import weight_buckets

            self.tensor_sync.push(weight_buckets(named, self.payload, self.bucket_bytes),
                                  version)
        else:
            for _ in named:  # the export is collective
                pass


def _device_uuid(index) -> str:
    """A GPU's UUID; "host" on the CPU layer, where rank 0 supplies every entry."""
    if not torch.cuda.is_available():
        return "host"
    return str(torch.cuda.get_device_properties(index).uuid)


def build_weight_sync(cfg, engine, policy, payload: str = "bf16") -> WeightSync:
    """Collective: how this rank takes part in every weight sync of the run."""
    from megatron_sppo.rollout.sglang_weights import TensorSync

    s = cfg.rollout.sglang
    dp_rank = policy.groups.dp_rank
    if not (cfg.rollout.engine == "sglang" and s.colocated) or dist.get_world_size() == 1:
        return WeightSync(engine, exports=dp_rank == 0)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (_device_uuid(torch.cuda.current_device()), dp_rank))
    plan = None
    if engine is not None:
        on_gpu = {}
        for rank, (uuid, _) in enumerate(everyone):
            on_gpu.setdefault(uuid, rank)
        plan = [[on_gpu.get(_device_uuid(g), 0) for g in gpus] for gpus in engine.server_gpus()]
    sources = broadcast_object(plan)
    replicas = {0} | {everyone[r][1] for row in sources for r in row}
    ranks = [r for r, (_, dp) in enumerate(everyone) if dp in replicas]
    group = dist.new_group(ranks, backend="gloo")
    if dist.get_rank() not in ranks:
        return WeightSync(None, exports=False)
    sync = TensorSync(engine.client.endpoints if engine is not None else [],
                      [[ranks.index(r) for r in row] for row in sources], group)
    if engine is not None:
        engine.sync = sync
        return WeightSync(engine, exports=True)
    return WeightSync(None, exports=True, tensor_sync=sync, payload=payload,
                      bucket_bytes=s.bucket_mb << 20)
