"""Process-level set-up: distributed init, the CPU device layer for megatron-core."""

from megatron_sppo.runtime.cpu import cpu_megatron_enabled, enable_cpu_megatron
from megatron_sppo.runtime.distributed import init_distributed

__all__ = ["enable_cpu_megatron", "cpu_megatron_enabled", "init_distributed"]
