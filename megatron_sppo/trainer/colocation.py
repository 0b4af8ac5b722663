"""Trainer and SGLang on the same GPUs: who holds the memory when.

While the engine generates, Megatron's gradient buffers and optimizer states are off the GPU
(the weights stay: the next sync reads them). While Megatron trains, the engine's weights, KV
cache and CUDA graphs are released. Before a weight sync the engine gets its weight memory
back first (SGLang copies the pushed tensors into it), and its KV cache and CUDA graphs only
after the push, so both never peak together. The order is slime's and verl's colocated
SGLang loop; checked against megatron-core 0.19 (``DistributedDataParallel.
offload_grad_buffers`` / ``restore_grad_buffers``, ``MegatronOptimizer.offload_to_cpu`` /
``restore_from_cpu``, both documented "for RL training") and SGLang 0.5.23
(``/release_memory_occupation`` and ``/resume_memory_occupation`` with tags ``weights``,
``kv_cache``, ``cuda_graph``; they need ``--enable-memory-saver``).
"""

from __future__ import annotations

import torch.distributed as dist

WEIGHTS = ["weights"]
CACHES = ["kv_cache", "cuda_graph"]


class Colocation:
    """``engine``: the rollout engine on global rank 0 (None elsewhere); ``models``: the
    trained models of this rank. ``release_engine``: the engine's memory saver is on.
    ``enabled`` False makes every phase a no-op (local engine, disaggregated servers)."""

    def __init__(self, engine, models: list, enabled: bool, release_engine: bool):
        self.engine, self.models = engine, models
        self.enabled, self.release_engine = enabled, release_engine and enabled
        self.phase = "train"  # Megatron holds its memory after start-up

    def _engine(self, method: str, tags: list[str] | None = None) -> None:
        if self.release_engine and self.engine is not None:
            getattr(self.engine, method)(tags)
        if self.release_engine and dist.get_world_size() > 1:
            dist.barrier()  # no rank allocates before the engine has let go

    def for_rollout(self) -> None:
        """Megatron's gradients and optimizer states leave the GPU; the engine is awake."""
        if not self.enabled or self.phase == "rollout":
            return
        for m in self.models:
            m.ddp.offload_grad_buffers()
            m.optimizer.offload_to_cpu()
        self.phase = "rollout"

    def for_training(self) -> None:
        """The engine releases everything; Megatron gets its buffers back (zeroed grads)."""
        if not self.enabled or self.phase == "train":
            return
        self._engine("release_memory")
        for m in self.models:
            m.ddp.restore_grad_buffers()
            m.optimizer.restore_from_cpu()
        self.phase = "train"

    def before_sync(self) -> None:
        """The engine's weight memory comes back for the push."""
        if self.enabled:
            self._engine("resume_memory", WEIGHTS)

    def after_sync(self) -> None:
        """The engine's KV cache and CUDA graphs come back; Megatron steps aside."""
        if self.enabled:
            self._engine("resume_memory", CACHES)
            self.for_rollout()
