"""GPU memory of an SGLang 0.5.23 TP rank: the KV pool sized once at start-up, and the memory
saver's release/resume by tag.

Sizing (distributed/bootstrap.py measure_pre_model_load_memory, mem_cache/
kv_cache_configurator.py _profile_available_bytes, model_executor/pool_configurator.py): the
free memory of the rank's GPU before the weights load (the minimum over the TP ranks), then
after: ``rest = free_after - free_before * (1 - mem_fraction_static)``; no rest is SGLang's
"Loaded weights leave no GPU memory for the KV cache" error, and the pool holds
``rest // cell_size`` tokens, ``cell_size = kv_heads_per_rank * (head_dim + v_head_dim) *
layers * kv_dtype_bytes``. Free memory is ``torch.cuda.mem_get_info``: under the emulated
accelerator it subtracts what every process on that GPU holds, a colocated trainer included.
The pool is a device allocation that every process on the GPU sees, backed by a sparse file
mapping, so a pool the size of a real GPU's costs no host memory.

Release/resume (managers/scheduler_components/weight_updater.py, with --enable-memory-saver;
without it both are no-ops apart from the tag bookkeeping): ``kv_cache`` frees the pool and
flushes the cache; ``weights`` frees the parameters (buffers are stashed and restored, as
SGLang does) and brings them back on resume either from a host copy
(--enable-weights-cpu-backup) or as whatever the re-mapped memory holds: here random values,
so a push is needed before they mean anything. Resuming a tag that is not released fails.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

TAGS = ("weights", "kv_cache", "cuda_graph")
GiB = 1 << 30


def free_gib(gpu_id: int, group=None) -> float:
    """get_available_gpu_memory: free GiB of this rank's GPU (minimum over ``group``)."""
    free = torch.tensor([torch.cuda.mem_get_info(gpu_id)[0] / GiB], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group)
    return float(free)


def cell_size(config, tp_size: int, dtype: torch.dtype) -> int:
    heads = max(1, config.num_key_value_heads // tp_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads * 2 * head_dim * config.num_hidden_layers * dtype.itemsize


def max_total_num_tokens(pre_gib: float, after_gib: float, mem_fraction_static: float,
                         cell: int) -> int:
    rest = after_gib - pre_gib * (1 - mem_fraction_static)
    if rest <= 0:
        minimum = 1 - after_gib / pre_gib
        raise ValueError(
            f"Loaded weights leave no GPU memory for the KV cache under "
            f"--mem-fraction-static={mem_fraction_static}. Raise --mem-fraction-static above "
            f"{int(minimum * 1000 + 0.999) / 1000:.3f} (minimum viable = 1 - available/pre = "
            f"{minimum:.4f}).")
    tokens = int(rest * GiB) // cell
    if tokens <= 0:
        raise RuntimeError("Not enough memory. Please try to increase --mem-fraction-static. "
                           f"Current value: mem_fraction_static={mem_fraction_static}")
    return tokens


def device_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of uint8 on an emulated GPU without touching host memory."""
    from megatron_sppo.runtime.emulated import DeviceTensor

    fd, path = tempfile.mkstemp(prefix="standin-kv-")
    try:
        os.ftruncate(fd, nbytes)
        host = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)
    return DeviceTensor(host, device.index)


class MemorySaver:
    """The rank's releasable memory: model parameters and the KV pool."""

    def __init__(self, model: torch.nn.Module, device: torch.device, pool_bytes: int, *,
                 enabled: bool, cpu_backup: bool):
        self.device, self.pool_bytes = device, pool_bytes
        self.enabled, self.cpu_backup = enabled, cpu_backup
        self.pool = device_buffer(pool_bytes, device)
        self.offloaded: set[str] = set()
        self._host: dict[str, torch.Tensor] = {}
        # every parameter slot, shared ones (tied embeddings) under their first name
        self.slots, first = [], {}
        for prefix, module in model.named_modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    key = first.setdefault(id(p), f"{prefix}.{attr}".lstrip("."))
                    self.slots.append((module, attr, key, p.shape, p.dtype))

    def released(self, tag: str) -> bool:
        return self.enabled and tag in self.offloaded

    def _swap(self, make) -> None:
        """New parameter objects (so the old device memory is freed), shared ones shared."""
        made = {}
        for module, attr, key, shape, dtype in self.slots:
            if key not in made:
                made[key] = torch.nn.Parameter(make(key, shape, dtype), requires_grad=False)
            module._parameters[attr] = made[key]

    def release(self, tags: list[str]) -> None:
        for tag in tags:
            self.offloaded.add(tag)
        if not self.enabled:
            return
        if "kv_cache" in tags:
            self.pool = None
        if "weights" in tags:
            if self.cpu_backup:
                self._host = {key: module._parameters[attr].detach().cpu()
                              for module, attr, key, _, _ in self.slots}
            self._swap(lambda key, shape, dtype: torch.empty(0, dtype=dtype, device=self.device))

    def resume(self, tags: list[str]) -> None:
        for tag in tags:
            self.offloaded.remove(tag)  # KeyError for a tag that was not released, as SGLang
        if not self.enabled:
            return
        if "weights" in tags:
            def make(key, shape, dtype):
                data = self._host[key] if self.cpu_backup else torch.randn(shape).to(dtype)
                return data.to(self.device)

            self._swap(make)
            self._host = {}
        if "kv_cache" in tags:
            self.pool = device_buffer(self.pool_bytes, self.device)
