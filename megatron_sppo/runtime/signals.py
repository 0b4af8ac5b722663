"""Stop signals, and helper processes that outlive them.

Slurm delivers its time-limit warning (SIGUSR1 with ``--signal``) and preemption or
cancellation (SIGTERM) to every process of a job step: srun forwards a signal to the whole
step, and torchrun's agent (``--signals-to-handle``) sends it to each worker's process group.
The trainer handles both (it checkpoints at the end of its step, then exits), but a helper
process it started (megatron-core's checkpoint writer, the reward workers, an SGLang
server) would die of the default action in the middle of that step or save.

A process started inside :func:`stop_signals_blocked` (or :func:`shielded_spawn` for
multiprocessing) inherits the signals blocked: the mask survives fork and exec, and neither
CPython nor multiprocessing unblocks it, so the signal stays pending and never kills the
helper. Helpers still end the way they did: on their parent's request, or by SIGKILL.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from multiprocessing import resource_tracker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_signals_blocked(signals: tuple = STOP_SIGNALS):
    """Block ``signals`` in this thread for the block's duration: processes started inside
    keep them blocked; the parent receives them afterwards (or in another thread)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def shielded_spawn():
    """:func:`stop_signals_blocked` for ``multiprocessing`` starts. Its resource-tracker
    process is started first, inside the block: starting it unblocks SIGINT and SIGTERM in
    the calling thread (``resource_tracker.ensure_running``, CPython 3.12), so they are
    blocked again before the helper itself is started."""
    with stop_signals_blocked():
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
