"""Process-level set-up: distributed init, the CPU device layer for megatron-core.

The members import torch when first used, not with the package: importing ``megatron_sppo``
stays light, so the train command installs its stop-signal handler (trainer/preemption.py)
a fraction of a second after the interpreter starts instead of seconds later.
"""

from importlib import import_module

_MEMBERS = {"enable_cpu_megatron": "cpu", "cpu_megatron_enabled": "cpu",
            "init_distributed": "distributed"}
__all__ = list(_MEMBERS)


def __getattr__(name: str):
    if name not in _MEMBERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MEMBERS[name]}"), name)
