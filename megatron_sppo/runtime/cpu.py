"""Run the real megatron-core code on CPU (gloo) when no GPU is present.

megatron-core assumes CUDA throughout: it allocates with ``device="cuda"`` or
``torch.cuda.current_device()``, synchronises and switches CUDA streams, checks
``param.type() == "torch.cuda.FloatTensor"`` and keeps its RNG states in the CUDA
generator.  :func:`enable_cpu_megatron` makes the CPU play the accelerator's role, so
that GPTModel, tensor/pipeline parallelism, DDP, the pipeline schedules, the Megatron
optimizer (gradient clipping included) and dist_checkpointing run unmodified:

* device arguments that name CUDA (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``,
  an integer ``device=0``) are rewritten to the CPU by a global ``TorchFunctionMode``;
* ``torch.cuda.current_device()`` returns the CPU device; ``Tensor.cuda()`` and
  ``Module.cuda()`` return their input unchanged;
* synchronisation, streams and events become no-ops (CPU work is synchronous);
* ``Tensor.type()`` reports a CPU tensor as its ``torch.cuda.*Tensor`` twin, which is
  what megatron-core's dtype checks compare against;
* the "CUDA" RNG is the CPU default generator, so megatron-core's RNG tracker (and
  activation recomputation, which saves and restores it) works; dropout is expected
  to be 0 for numerical comparisons anyway.

Nothing is changed when CUDA is available: on a GPU :func:`enable_cpu_megatron` returns
False immediately.  Call it before importing megatron-core modules that may capture
``torch.cuda`` attributes at import time, and from the main thread (torch function modes
are thread-local).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_ENABLED = False


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and (_is_cuda_device(device) or isinstance(device, int)):
            kwargs["device"] = _CPU
        if any(_is_cuda_device(a) for a in args):
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class NoOpStream:
    """Stands in for ``torch.cuda.Stream``; stays a class so annotations like
    ``torch.cuda.Stream | None`` (evaluated by transformers at import) still work."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def is_capturing(self):
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class NoOpEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is already complete when recorded."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _tensor_type_as_cuda(original):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = original(self)  # may already come back renamed through the function mode
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _patch_megatron_rng() -> None:
    """megatron-core sets the CUDA RNG through its own helper; point it at the CPU RNG."""
    try:
        from megatron.core.tensor_parallel import random as mcore_random
    except ImportError:  # megatron-core is optional for pure-math users
        return

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._set_cuda_rng_state = set_rng_state


def enable_cpu_megatron(force: bool = False) -> bool:
    """Install the CPU device layer if CUDA is absent. Idempotent.

    Returns True when a layer is active (now or from an earlier call), False on a GPU
    machine, where nothing is changed. With ``MEGATRON_SPPO_EMULATE_GPU=1`` the strict layer
    (:mod:`megatron_sppo.runtime.emulated`) is installed instead: an emulated GPU apart from
    the host, on which code takes its GPU paths. ``force=True`` (or ``MEGATRON_SPPO_FORCE_CPU=1``)
    installs it even when CUDA is present, for CPU jobs such as checkpoint conversion,
    which must not take GPU memory from a job sharing the node.
    """
    global _ENABLED
    if _ENABLED:
        return True
    force = force or os.environ.get("MEGATRON_SPPO_FORCE_CPU") == "1"
    if torch.cuda.is_available() and not force:
        return False
    from megatron_sppo.runtime import emulated

    if emulated.requested() and not force:
        emulated.enable()  # the strict layer: host and an emulated device apart
        _ENABLED = True
        return True

    cuda = torch.cuda
    cuda.is_available = lambda: False
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = NoOpStream
    cuda.ExternalStream = NoOpStream
    cuda.Event = NoOpEvent
    cuda.current_stream = lambda device=None: NoOpStream()
    cuda.default_stream = lambda device=None: NoOpStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.is_current_stream_capturing = lambda: False
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.random.manual_seed = cuda.manual_seed

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type_as_cuda(torch.Tensor.type)

    # Expected on CPU: megatron-core falls back to its pure-PyTorch multi-tensor kernels.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Apex is not installed")
    _patch_megatron_rng()
    _CudaToCpuMode().__enter__()  # global for the main thread; never exited
    _ENABLED = True
    return True


def cpu_megatron_enabled() -> bool:
    """Whether :func:`enable_cpu_megatron` has installed the CPU layer in this process."""
    return _ENABLED
