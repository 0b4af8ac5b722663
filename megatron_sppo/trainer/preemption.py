"""Stopping on a signal without losing work: SIGTERM (preemption, ``scancel``) or SIGUSR1
(Slurm's warning ``--signal`` seconds before the time limit) ends the current step, then a
complete checkpoint of it, then a clean exit, on every rank.

* The handler is installed when the train command starts, before the models are built, so
  a signal that arrives during start-up is kept (the first step then runs and is saved).
* Every rank stops after the same step: one all-reduce per step (:meth:`StopRequest.poll`).
* Helper processes do not die of the signal meanwhile (``runtime.signals``).
* ``MEGATRON_SPPO_SIGNAL_LEAD_S`` (the sbatch scripts set it to their signal lead) says how
  long after the signal the job is killed: a checkpoint that will not, or did not, finish
  in that time is reported with the fix.
* ``<output_dir>/stopped.json`` records a stop with steps left, after its checkpoint is
  complete; the sbatch script requeues the job only then. A run removes it when it starts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from megatron_sppo.fileio import write_text_atomic
from megatron_sppo.runtime.signals import STOP_SIGNALS

LEAD_ENV = "MEGATRON_SPPO_SIGNAL_LEAD_S"
STOPPED = "stopped.json"


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class StopRequest:
    """The stop signals set a flag (and the time of the first one); nothing else happens in
    the handler, so a signal can never interrupt a collective or a save half-way."""

    def __init__(self):
        self.signal: str | None = None
        self.received: float | None = None  # time.monotonic() of the first signal
        self.save_seconds: float | None = None  # how long the last checkpoint took
        lead = os.environ.get(LEAD_ENV)
        self.lead_s = float(lead) if lead else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.received = signal.Signals(signum).name, time.monotonic()

    def poll(self, step_seconds: float) -> tuple[bool, float]:
        """Collective, once per step: whether any rank was signalled, and the step's longest
        wall time over the ranks. That time is the one part of the run state each rank
        measures for itself; agreeing it here keeps the checkpoint's common state identical
        on every rank (and the ``trainer.max_train_seconds`` decision too)."""
        import torch
        import torch.distributed as dist

        both = torch.tensor([1.0 if self.signal else 0.0, step_seconds], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        stop = bool(both[0].item())
        if stop and self.signal is None:
            self.signal, self.received = "another rank's signal", time.monotonic()
        return stop, both[1].item()

    @contextmanager
    def timed_save(self, step: int, stopping: bool):
        """Time the checkpoint inside; when it is the stop's, report on rank 0 how it fits in
        the signal lead."""
        if stopping and _rank0():
            print(self._before_save(step), flush=True)
        start = time.monotonic()
        yield
        self.save_seconds = time.monotonic() - start
        if stopping and _rank0():
            print(self._after_save(step), flush=True)

    def _before_save(self, step: int) -> str:
        since = time.monotonic() - self.received
        text = f"{self.signal} received: checkpointing step {step} ({since:.1f} s after it"
        if self.lead_s is None:
            return text + ")"
        left = self.lead_s - since
        text += f", {left:.1f} s of the {self.lead_s:g} s signal lead left)"
        if self.save_seconds is not None and self.save_seconds > left:
            text += (f"\nwarning: the last checkpoint took {self.save_seconds:.1f} s, more than "
                     "is left: this one may not complete before the job is killed; raise the "
                     "signal lead (render_slurm.py --signal-lead)")
        return text

    def _after_save(self, step: int) -> str:
        since = time.monotonic() - self.received
        text = (f"checkpointed step {step} in {self.save_seconds:.1f} s, {since:.1f} s after "
                f"{self.signal}; exiting")
        if self.lead_s is not None and since > self.lead_s:
            text += (f"\nwarning: the step and its checkpoint ended {since - self.lead_s:.1f} s "
                     f"after the {self.lead_s:g} s signal lead ran out: under Slurm the job "
                     "is killed first and the checkpoint is lost; raise the signal lead "
                     "(render_slurm.py --signal-lead)")
        return text

    def mark_stopped(self, output_dir: str | Path, step: int) -> None:
        """Rank 0, after the checkpoint of ``step`` is complete: record the stop."""
        record = {"signal": self.signal, "step": step, "checkpoint": f"step_{step:07d}"}
        write_text_atomic(Path(output_dir) / STOPPED, json.dumps(record) + "\n")


_REQUEST: StopRequest | None = None


def stop_request() -> StopRequest:
    """This process's StopRequest, its handlers installed by the first call: the train command
    makes it before it imports anything heavy, so a signal during start-up is kept."""
    global _REQUEST
    if _REQUEST is None:
        _REQUEST = StopRequest()
    return _REQUEST


def clear_stopped(output_dir: str | Path) -> None:
    """A starting run is no longer stopped."""
    (Path(output_dir) / STOPPED).unlink(missing_ok=True)
