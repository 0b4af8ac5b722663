"""Receiving pushed weights as an SGLang 0.5.23 TP rank does.

* ``/update_weights_from_tensor``: each TP rank unpickles only ITS entry of
  ``serialized_named_tensors`` (tp_worker.deserialize_own_rank; a list shorter than the TP size
  fails on the ranks past its end) through SafeUnpickler, whose allow-list is read from the
  pinned wheel into tests/fixtures/sglang_protocol.json (utils/common.py); ``load_format``
  ``"flattened_bucket"`` rebuilds the tensors from the uint8 buffer and the metadata read by
  attribute (model_runner_components/weight_updater.py, weight_sync/tensor_bucket.py),
  ``"direct"`` copies each tensor into the parameter of that name, None goes through the
  model's weight loader.
* ``/init_weights_update_group``: each TP rank joins as ``rank_offset + tp_rank`` a group
  built like utils/common.py's init_custom_process_group (tcp rendezvous, PrefixStore of the
  group name, torch's group helper); ``/update_weights_from_distributed`` receives one
  broadcast from rank 0 into an empty bucket of the announced names, dtypes and shapes
  (FlattenedTensorBucket.empty rejects misaligned offsets).

The stand-in's model is a transformers model, so its parameter names are the HF names the
trainer sends; SGLang's own loader maps the same names onto its fused, sharded parameters.
"""

from __future__ import annotations

import base64
import io
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from sglang.launch_server import SafeUnpickler

def deserialize_own_rank(serialized: list, tp_rank: int):
    """MultiprocessingSerializer.deserialize(serialized_named_tensors[tp_rank])."""
    data = serialized[tp_rank]
    raw = base64.b64decode(data, validate=True) if isinstance(data, str) else bytes(data)
    return SafeUnpickler(io.BytesIO(raw)).load()


def reconstruct(flat: torch.Tensor, metadata) -> list[tuple[str, torch.Tensor]]:
    """FlattenedTensorBucket.reconstruct_tensors: views of the uint8 buffer."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape))
            for m in metadata]


def empty_bucket(names, dtypes, shapes, device) -> tuple[torch.Tensor, list]:
    """FlattenedTensorBucket.empty: the receive buffer and its layout."""
    from types import SimpleNamespace

    metadata, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        if offset % dtype.itemsize:
            raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, "
                             f"dtype {dtype}")
        size = torch.Size(shape).numel() * dtype.itemsize
        metadata.append(SimpleNamespace(name=name, shape=torch.Size(shape), dtype=dtype,
                                        start_idx=offset, end_idx=offset + size))
        offset += size
    if not metadata:
        raise ValueError("Cannot create empty tensor bucket")
    return torch.empty(offset, dtype=torch.uint8, device=device), metadata


def init_custom_process_group(backend: str, address: str, port: int, world_size: int,
                              rank: int, group_name: str, timeout_s: float = 600.0):
    """utils/common.py's init_custom_process_group (the engine side of the weight group)."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world,
                                                    rendezvous)

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend),
                                         PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def receive_broadcast(group, names, dtypes, shapes, device) -> list[tuple[str, torch.Tensor]]:
    flat, metadata = empty_bucket(names, dtypes, shapes, device)
    dist.broadcast(flat, src=0, group=group)
    return reconstruct(flat, metadata)


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """The served checkpoint's safetensors files into the model (every weight present)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}: give a model directory with "
                                "weights or --load-format dummy")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    load_weights(model, state.items())
    missing = {n for n, _ in model.named_parameters()} - set(state)
    if missing - {"lm_head.weight"} or ("lm_head.weight" in missing
                                         and not model.config.tie_word_embeddings):
        raise ValueError(f"{path} lacks weights: {sorted(missing)[:5]}")


def load_weights(model: torch.nn.Module, named, *, direct: bool = False) -> None:
    """Copy pushed tensors into the model's parameters (an unknown name fails, as SGLang's
    loaders do with a KeyError); tied embeddings have no separate head to load."""
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, tensor in named:
            if name == "lm_head.weight" and tied and not direct:
                continue
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: pushed shape {list(tensor.shape)}, the model has "
                                 f"{list(param.shape)}")
            param.copy_(tensor)
