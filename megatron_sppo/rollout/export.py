"""Streaming Megatron -> HF-name export of a live (TP/PP-parallel) policy, in buckets.

One exporter serves every consumer of full HF tensors: the local engine, SGLang weight sync
(CUDA IPC or NCCL broadcast) and the ``megatron-to-hf`` conversion tool. Per parameter it
all-gathers the TP shards along the dimension megatron-core records on the parameter
(``tensor_model_parallel`` / ``partition_dim``: column-parallel and vocab-parallel tensors on
dim 0, row-parallel on dim 1), then splits and renames through
:mod:`megatron_sppo.checkpoint.hf_mapping` (q/k/v, gate/up, vocabulary padding removed).
Only one parameter's gathered copy exists at a time beyond the current bucket, so the extra
memory is about ``bucket_bytes`` whatever the model size.

Order is deterministic and the same on every rank: HF order (embedding, layers 0..L-1, final
norm, head). With tied embeddings the head is skipped (HF has only ``embed_tokens``; the last
stage's copy of it under PP is megatron's, not a weight of its own).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_sppo.checkpoint.hf_mapping import (ParamMapping, canonical_name, hf_shapes,
                                                 hf_tensors_from_megatron, param_mappings)
from megatron_sppo.models.hf_config import ModelArch

DEFAULT_BUCKET_BYTES = 512 << 20

Bucket = list[tuple[str, torch.Tensor]]


def layer_offset(model) -> int:
    """Global index of this pipeline chunk's first decoder layer."""
    layers = getattr(model.decoder, "layers", None)
    return layers[0].layer_number - 1 if layers else 0


def _unwrap(model):
    """DDP / Float16Module wrappers keep the GPTModel in ``.module``."""
    while hasattr(model, "module"):
        model = model.module
    return model


def local_parameters(model) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters keyed by canonical (global-layer) megatron name.

    ``model`` is a GPTModel chunk, possibly wrapped, or a list of chunks (virtual pipeline).
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    params = {}
    for chunk in map(_unwrap, chunks):
        offset = layer_offset(chunk)
        for name, param in chunk.named_parameters():
            params[canonical_name(name, offset)] = param
    return params


def _exported_mappings(arch: ModelArch) -> list[ParamMapping]:
    return [m for m in param_mappings(arch)
            if not (m.megatron == "output_layer.weight" and arch.tie_embeddings)]


def gather_tensor_parallel(param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a TP-sharded megatron parameter (the parameter itself if replicated).

    Collective over the TP group when the parameter is sharded: all TP ranks must call it.
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    shard = param.detach().contiguous()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def _stage_owners(local: dict[str, torch.Tensor]) -> dict[str, tuple[int, torch.dtype]]:
    """canonical name -> (pipeline rank holding it, dtype), agreed on by all PP ranks."""
    from megatron.core import parallel_state

    mine = {name: p.dtype for name, p in local.items()}
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return {name: (0, dtype) for name, dtype in mine.items()}
    group = parallel_state.get_pipeline_model_parallel_group()
    stages = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, mine, group=group)
    owners = {}
    for rank, names in enumerate(stages):
        for name, dtype in names.items():
            owners.setdefault(name, (rank, dtype))
    return owners


def iter_hf_tensors_live(model, arch: ModelArch, *, gather_pipeline: bool = False,
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs of a live megatron policy, in HF order.

    Collective: every rank of the model-parallel group must iterate to the end. Each
    pipeline stage yields its own parameters (every TP rank of the stage the same full
    tensors); with ``gather_pipeline`` every rank yields the whole model, each stage
    broadcasting its tensors over the PP group. Tensors may share memory with the live
    parameters: copy them before the parameters change.
    """
    from megatron.core import parallel_state

    local = local_parameters(model)
    owners = _stage_owners(local)
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    device = next(iter(local.values())).device if local else torch.device("cpu")
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shapes = hf_shapes(arch)
    for mapping in _exported_mappings(arch):
        if mapping.megatron not in owners:
            raise RuntimeError(f"no pipeline stage holds {mapping.megatron}: the model does "
                               f"not match the {arch.family} architecture it was exported as")
        owner, dtype = owners[mapping.megatron]
        if owner == my_stage:
            full = gather_tensor_parallel(local[mapping.megatron])
            tensors = hf_tensors_from_megatron(mapping, full, arch, tp)
        elif gather_pipeline:
            tensors = {n: torch.empty(shapes[n], dtype=dtype, device=device) for n in mapping.hf}
        else:
            continue
        if gather_pipeline and dist.get_world_size(pp_group) > 1:
            src = dist.get_global_rank(pp_group, owner)
            for tensor in tensors.values():
                dist.broadcast(tensor, src=src, group=pp_group)
        yield from tensors.items()


def bucketed(named: Iterable[tuple[str, torch.Tensor]],
             bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    """Group (name, tensor) pairs in order into lists of at most ``bucket_bytes`` bytes
    (a larger tensor travels alone)."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def iter_hf_buckets(model, arch: ModelArch, bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                    gather_pipeline: bool = False) -> Iterator[Bucket]:
    """:func:`iter_hf_tensors_live` grouped into buckets of at most ``bucket_bytes``."""
    return bucketed(iter_hf_tensors_live(model, arch, gather_pipeline=gather_pipeline),
                    bucket_bytes)
