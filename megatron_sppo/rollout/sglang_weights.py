"""Megatron -> SGLang weight sync: the payloads and the two transports.

Both transports move the exporter's buckets (:mod:`megatron_sppo.rollout.export`) inside one
weight-update session per server: ``/pause_generation`` (retract: running requests wait and
resume with the new weights), ``/begin_weight_update``, the bucket calls with
``flush_cache=false``, ``/end_weight_update``, one ``/flush_cache``, ``/continue_generation``.

* Colocated (:class:`TensorSync`): each bucket is flattened into one uint8 tensor plus
  metadata and posted to ``/update_weights_from_tensor`` with ``load_format
  "flattened_bucket"``; the tensor travels as a CUDA-IPC handle, so the trainer rank on the
  same GPU as SGLang TP rank i supplies entry i of ``serialized_named_tensors`` (every TP rank
  reads its own entry: a TP=2 server needs two). NCCL cannot serve this placement: a trainer
  rank and a server rank on one GPU cannot share a communicator ("Duplicate GPU detected").
* Separate rollout GPUs (:class:`BroadcastSync`): the trainer joins a process group as rank
  0 with every engine GPU (``/init_weights_update_group``); per bucket it posts
  ``/update_weights_from_distributed`` (names, dtypes, shapes in the flattened order) and
  broadcasts the flattened bucket while that call is pending.

Protocol read from the SGLang 0.5.23 wheel (sglang-0.5.23-cp312, files under sglang/srt/):
weight_sync/tensor_bucket.py (FlattenedTensorBucket: tensors flattened to uint8 and
concatenated; FlattenedTensorBucket.empty rebuilds the receive layout from names, dtypes,
shapes, contiguous, and rejects misaligned offsets); utils/common.py
(MultiprocessingSerializer = ForkingPickler + base64; SafeUnpickler's allow-list, which has
types.SimpleNamespace, torch.Size, torch dtypes and the torch rebuild functions, so metadata
needs no sglang class; init_custom_process_group); utils/patch_torch.py (CUDA tensors are
pickled with the device UUID instead of its index); model_runner_components/
weight_updater.py (the flattened bucket's metadata is read by attribute) and
scheduler_components/weight_updater.py (updates are refused outside begin/end_weight_update).
The trainer never imports sglang: the serialiser below produces the same bytes.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import time
import types
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_sppo.rollout.export import Bucket
from megatron_sppo.rollout.sglang_client import SGLangHTTP, on_each

WEIGHT_UPDATE_GROUP = "weight_update_group"


def flatten_bucket(bucket: Bucket) -> tuple[torch.Tensor, list[types.SimpleNamespace]]:
    """(uint8 tensor, metadata) in SGLang's FlattenedTensorBucket layout.

    Tensors are ordered by element size, largest first (stable), so every offset is a
    multiple of its dtype's size: the receiver's ``view(dtype)`` and its alignment check in
    ``FlattenedTensorBucket.empty`` accept the layout without padding.
    """
    ordered = sorted(bucket, key=lambda nt: -nt[1].element_size())
    parts, metadata, offset = [], [], 0
    for name, tensor in ordered:
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        metadata.append(types.SimpleNamespace(
            name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype, start_idx=offset,
            end_idx=offset + flat.numel(), numel=flat.numel()))
        parts.append(flat)
        offset += flat.numel()
    return torch.cat(parts), metadata


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ipc_pickler():
    """ForkingPickler that sends CUDA tensors with their device UUID (GPU-only path).

    SGLang rebuilds CUDA-IPC tensors through its patched ``rebuild_cuda_tensor``, which maps a
    UUID to its own device index: the sender's index means nothing under a different
    CUDA_VISIBLE_DEVICES. CPU tensors keep torch's shared-memory reduction.
    """
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    class IpcPickler(ForkingPickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                rebuild, args = reductions.reduce_tensor(obj)
                device = args[6]  # storage_device, as in sglang's _REDUCE_TENSOR_ARG_DEVICE_INDEX
                uuid = str(torch.cuda.get_device_properties(device).uuid)
                return rebuild, (*args[:6], uuid, *args[7:])
            return NotImplemented

    return IpcPickler


def serialize_for_ipc(obj) -> str:
    """MultiprocessingSerializer.serialize(obj, output_str=True), without importing sglang."""
    buf = io.BytesIO()
    _ipc_pickler()(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@contextlib.contextmanager
def weight_update_session(endpoints: list[SGLangHTTP], pause_mode: str = "retract"):
    """Pause, open the update session, and afterwards close it, flush once and resume."""
    on_each(endpoints, lambda e: e.pause_generation(pause_mode))
    try:
        on_each(endpoints, lambda e: e.call("/begin_weight_update", {}))
        try:
            yield
        finally:
            on_each(endpoints, lambda e: e.call("/end_weight_update", {}))
        on_each(endpoints, lambda e: e.flush_cache())
    finally:
        on_each(endpoints, lambda e: e.continue_generation())


def share_host_tensors_by_file() -> None:
    """Host tensors cross to an unrelated process only as shared-memory files: torch's default
    ``file_descriptor`` strategy pickles a DupFd that only a child of this process can open."""
    import torch.multiprocessing

    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


class TensorSync:
    """Colocated sync through ``/update_weights_from_tensor`` (CUDA IPC), per server and per
    server TP rank.

    ``sources[i][j]``: the rank (of ``group``) that supplies entry j of server i's
    ``serialized_named_tensors``, the one on the GPU of server i's TP rank j; each entry is its
    own pickle (its own IPC reference), read by that TP rank only. Every rank of ``group``
    calls :meth:`push` with the same buckets; group rank 0 gathers the entries, posts every
    server's call and holds the weight-update sessions, and all ranks keep their bucket alive
    until the servers have read it. ``group`` None: this process supplies every entry (a
    single trainer process; a TP rank on another GPU opens the handle across GPUs).
    """

    def __init__(self, endpoints: list[SGLangHTTP], sources: list[list[int]], group=None):
        self.endpoints = endpoints
        self.sources = sources
        self.group = group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.mine = [(i, j) for i, row in enumerate(sources) for j, r in enumerate(row)
                     if r == self.rank]

    def _entries(self, bucket: Bucket) -> tuple[torch.Tensor, dict]:
        flat, metadata = flatten_bucket(bucket)
        if not flat.is_cuda:
            share_host_tensors_by_file()
        return flat, {slot: serialize_for_ipc({"flattened_tensor": flat, "metadata": metadata})
                      for slot in self.mine}

    def _post(self, entries: dict, version: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.endpoints))) as pool:
            calls = [pool.submit(e.call, "/update_weights_from_tensor", {
                "serialized_named_tensors": [entries[i, j] for j in range(len(row))],
                "load_format": "flattened_bucket", "flush_cache": False,
                "weight_version": str(version)})
                for i, (e, row) in enumerate(zip(self.endpoints, self.sources))]
            for call in calls:
                call.result()

    def push(self, buckets: Iterable[Bucket], version: int) -> int:
        """Send every bucket; returns how many."""
        count = 0
        leader = self.rank == 0
        session = weight_update_session(self.endpoints) if leader else contextlib.nullcontext()
        with session:
            for bucket in buckets:
                flat, entries = self._entries(bucket)  # flat lives until the servers read it
                if self.group is not None:
                    gathered = [None] * dist.get_world_size(self.group) if leader else None
                    dist.gather_object(entries, gathered, group_dst=0, group=self.group)
                    entries = {k: v for part in gathered or [] for k, v in part.items()}
                if leader:
                    self._post(entries, version)
                if self.group is not None:  # the servers have opened every rank's handles
                    dist.barrier(group=self.group)
                count += 1
        return count


def join_weight_update_group(master_address: str, master_port: int, world_size: int,
                             rank: int = 0, group_name: str = WEIGHT_UPDATE_GROUP,
                             backend: str = "nccl", timeout_s: float = 600.0):
    """A process group with the engines, built as SGLang's init_custom_process_group builds
    its side (tcp rendezvous, PrefixStore(group_name), torch's group helper), so that both
    ends meet in the same store keys; rank 0 (the trainer) hosts the store."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world,
                                                    rendezvous)

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                              world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend),
                                         PrefixStore(group_name, store), group_name=group_name,
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class BroadcastSync:
    """Sync to rollout servers on other GPUs: the trainer broadcasts over NCCL as rank 0.

    ``tp_sizes[i]`` is server i's TP size (its GPUs join as ranks ``1 + sum(tp_sizes[:i])``
    onwards). ``master_address`` must be reachable from the servers. ``device`` is where the
    flattened bucket is built (the broadcast's device: CUDA for NCCL).
    """

    def __init__(self, endpoints: list[SGLangHTTP], tp_sizes: list[int], *,
                 master_address: str, master_port: int, group_name: str = WEIGHT_UPDATE_GROUP,
                 backend: str = "nccl", device: str | torch.device = "cuda",
                 timeout_s: float = 600.0):
        self.endpoints = endpoints
        self.tp_sizes = tp_sizes
        self.master_address, self.master_port = master_address, master_port
        self.group_name, self.backend = group_name, backend
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, len(endpoints)))

    def _post_all(self, path: str, payloads: list[dict]) -> list[concurrent.futures.Future]:
        return [self._pool.submit(e.call, path, p, self.timeout_s)
                for e, p in zip(self.endpoints, payloads)]

    def connect(self) -> None:
        """Every server joins (its call blocks until the group is complete) while we do."""
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.endpoints))]
        calls = self._post_all("/init_weights_update_group", [
            {"master_address": self.master_address, "master_port": self.master_port,
             "rank_offset": offset, "world_size": world, "group_name": self.group_name,
             "backend": self.backend} for offset in offsets])
        self.group = join_weight_update_group(self.master_address, self.master_port, world,
                                              0, self.group_name, self.backend, self.timeout_s)
        for call in calls:
            call.result()

    def push(self, buckets: Iterable[Bucket], version: int) -> int:
        """Send every bucket in order; returns how many."""
        if self.group is None:
            self.connect()
        count = 0
        with weight_update_session(self.endpoints):
            for bucket in buckets:
                flat, metadata = flatten_bucket(bucket)
                spec = {"names": [m.name for m in metadata],
                        "dtypes": [_dtype_name(m.dtype) for m in metadata],
                        "shapes": [list(m.shape) for m in metadata],
                        "group_name": self.group_name, "flush_cache": False,
                        "weight_version": str(version), "load_format": "flattened_bucket"}
                calls = self._post_all("/update_weights_from_distributed",
                                       [spec] * len(self.endpoints))
                self._broadcast(flat.to(self.device), calls)
                count += 1
        return count

    def _broadcast(self, flat: torch.Tensor, calls: list[concurrent.futures.Future]) -> None:
        """Broadcast while the servers' calls are pending; a server that refused the call
        (and so never joins the broadcast) fails it at once instead of hanging it."""
        work = dist.broadcast(flat, src=0, group=self.group, async_op=True)
        while not work.is_completed():
            for call in calls:
                if call.done() and call.exception() is not None:
                    raise call.exception()
            time.sleep(0.005)
        work.wait()
        for call in calls:
            call.result()

    def close(self) -> None:
        """Leave the group on both ends."""
        if self.group is None:
            return
        for call in self._post_all("/destroy_weights_update_group",
                                   [{"group_name": self.group_name}] * len(self.endpoints)):
            call.result()
        dist.destroy_process_group(self.group)
        self.group = None
        self._pool.shutdown(wait=False)
