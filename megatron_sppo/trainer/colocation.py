"""Trainer and SGLang on the same GPUs: who holds the memory when.

While the engine generates, Megatron's gradient buffers and optimizer states are off the GPU
(the weights stay: the next sync reads them). While Megatron trains, the engine's KV cache and
CUDA graphs are released, and its weights too when a weight sync follows the step. Before a
sync the engine gets its weight memory back (SGLang copies the pushed tensors into it); before
the next rollout Megatron steps aside and then the engine's KV cache and CUDA graphs come back,
so both never peak together. The servers are launched before any Megatron state exists and
release everything at once, so SGLang sizes its KV cache against a free GPU.

Released weights come back as whatever the re-mapped memory holds (SGLang 0.5.23 without
``--enable-weights-cpu-backup``): only a push makes them weights again. So they are released
only when a sync follows (not in the critic's warm-up steps), resumed only by
:meth:`Colocation.before_sync`, and a rollout from released weights is refused.

The order is slime's and verl's colocated SGLang loop; checked against megatron-core 0.19
(``DistributedDataParallel.offload_grad_buffers`` / ``restore_grad_buffers``,
``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu``, both documented "for RL
training") and SGLang 0.5.23 (``/release_memory_occupation`` and
``/resume_memory_occupation`` with tags ``weights``, ``kv_cache``, ``cuda_graph``; they need
``--enable-memory-saver``; resuming a tag that is not released fails).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

WEIGHTS = ["weights"]
CACHES = ["kv_cache", "cuda_graph"]


class Colocation:
    """``engine``: the rollout engine on global rank 0 (None elsewhere); ``models``: the
    trained models of this rank. ``release_engine``: the engine's memory saver is on.
    ``enabled`` False makes every phase a no-op (local engine, disaggregated servers).
    Every rank keeps the same record of what the engine has released."""

    def __init__(self, engine, models: list, enabled: bool, release_engine: bool):
        self.engine, self.models = engine, models
        self.enabled, self.release_engine = enabled, release_engine and enabled
        self.phase = "train"  # Megatron holds its memory after start-up
        self.released: list[str] = []
        self.memory: dict[str, float] = {}  # the hand-over figures of the last step

    def _measure(self, phase: str) -> None:
        """This rank's GPU memory once a phase holds it (``memory/<phase>_*`` metrics, GiB):
        what Megatron has allocated, and what the GPU has free with the engine's share."""
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            self.memory[f"memory/{phase}_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
            self.memory[f"memory/{phase}_free_gb"] = free / 2**30

    def _engine(self, method: str, tags: list[str]) -> None:
        if self.engine is not None:
            getattr(self.engine, method)(tags)
        if dist.get_world_size() > 1:
            dist.barrier()  # no rank allocates before the engine has let go

    def release(self, tags: list[str]) -> None:
        """The engine frees the memory of ``tags`` (those not released already)."""
        tags = [t for t in tags if self.release_engine and t not in self.released]
        if tags:
            self._engine("release_memory", tags)
            self.released += tags

    def _resume(self, tags: list[str]) -> None:
        tags = [t for t in tags if t in self.released]
        if tags:
            self._engine("resume_memory", tags)
            self.released = [t for t in self.released if t not in tags]

    def for_training(self, release_weights: bool = True) -> None:
        """The engine releases its caches (and its weights when a sync follows); Megatron gets
        its buffers back (zeroed grads)."""
        if not self.enabled or self.phase == "train":
            return
        self.release(CACHES + (WEIGHTS if release_weights else []))
        for m in self.models:
            m.ddp.restore_grad_buffers()
            m.optimizer.restore_from_cpu()
        self.phase = "train"
        self._measure("train")

    def before_sync(self) -> None:
        """The engine's weight memory comes back for the push that follows."""
        if self.enabled:
            self._resume(WEIGHTS)

    def for_rollout(self) -> None:
        """Megatron's gradients and optimizer states leave the GPU, then the engine's caches
        come back."""
        if not self.enabled:
            return
        if "weights" in self.released:
            raise RuntimeError("the rollout engine's weights are released and no weight sync "
                               "brought them back: it would generate from garbage")
        if self.phase != "rollout":
            for m in self.models:
                m.ddp.offload_grad_buffers()
                m.optimizer.offload_to_cpu()
            self.phase = "rollout"
        self._resume(CACHES)
        self._measure("rollout")
