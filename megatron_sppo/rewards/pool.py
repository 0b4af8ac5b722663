"""A pool of worker processes that runs reward checks with a time limit on each one.

A verifier is arbitrary code on model output: sympy can spend hours on ``9^{9^{9^{9}}}``
inside one C call (no signal or thread timeout can interrupt it), and a user function can
segfault or leak. So each check runs in a worker process, and a check that outlives its time
limit gets its worker killed and replaced; it scores as a timeout, and the batch goes on.
A worker that dies is replaced the same way (its check counts as an error). Only an exception
*raised* by the function is the caller's problem: it comes back as :class:`TaskError`.

Each worker owns a pipe. The parent hands it a small chunk of tasks, the worker answers one
message per task, and the parent times each task from the previous answer of that worker, so
a chunk never stretches the limit. Tasks travel pickled one by one with the parent's
``sys.path``, so a function the worker cannot import fails as that task's error.

Workers are started with ``spawn`` (forking a trainer that holds CUDA and NCCL threads is
unsafe; as always with spawn, the main script must guard its work with
``if __name__ == "__main__"``) and say they are ready only after their imports, which
therefore never count against a time limit. They start with SIGTERM and SIGUSR1 blocked
(``runtime.signals``): a Slurm time-limit or preemption signal reaches every process of the
job step, and it is the trainer's to handle (it finishes its step, then checkpoints), not a
reason for the step's reward checks to crash. Since such a worker also ignores
multiprocessing's exit-time SIGTERM, the pool closes itself at interpreter exit.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import pickle
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from megatron_sppo.runtime.signals import shielded_spawn

OK, TIMEOUT, CRASH = "ok", "timeout", "crash"
_worker = {"inside": False}  # True in a worker process: its pool's limit covers all it runs


def in_worker() -> bool:
    """Whether this process is a pool worker (whose checks its parent already times, and
    which, as a daemon process, cannot start workers of its own)."""
    return _worker["inside"]


class TaskError(Exception):
    """The function raised inside the worker; ``index`` is the task's position."""

    def __init__(self, index: int, kind: str, message: str, where: str, worker_traceback: str):
        super().__init__(f"{kind}: {message}")
        self.index, self.kind, self.message = index, kind, message
        self.where, self.worker_traceback = where, worker_traceback


class PoolError(RuntimeError):
    """Workers cannot start (their imports fail or they die before saying ready)."""


@dataclass
class PoolResult:
    """Per task: the function's return value (None unless ``status == "ok"``) and its status
    (``ok``/``timeout``/``crash``); plus the counts the trainer logs."""

    values: list
    status: list[str]
    timeouts: int = 0
    errors: int = 0
    no_answer: int = 0  # tasks whose function returned None (found no answer)


def _serve(conn, preload) -> None:
    """Worker main loop. ``preload`` (the functions this pool will run) was unpickled before
    this runs, so its modules are imported by the time the worker says ready."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker["inside"] = True
    del preload
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        path, tasks = chunk
        sys.path[:] = path  # a module the parent can import since this worker started
        for index, payload in tasks:
            try:
                fn, args = pickle.loads(payload)
                reply = (OK, index, fn(*args))
            except Exception as e:  # the parent decides; the worker stays up
                tb = traceback.extract_tb(e.__traceback__)
                where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
                reply = ("raise", index, type(e).__name__, str(e), where, traceback.format_exc())
            try:
                conn.send(reply)
            except Exception as e:  # the result does not pickle
                conn.send(("raise", index, type(e).__name__, f"its result cannot be sent: {e}",
                           "?", ""))


@dataclass
class _Worker:
    proc: object
    conn: object
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    assigned: deque = field(default_factory=deque)
    since: float = 0.0  # when the head of ``assigned`` started


class WorkerPool:
    """``workers`` processes; ``run(tasks)`` runs ``fn(*args)`` for each ``(fn, args)`` task
    (``fn`` picklable: a module-level function or a ``functools.partial`` of one) with at
    most ``timeout_s`` seconds each. ``preload`` lists functions whose modules the workers
    import before accepting work."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, preload: tuple = (),
                 start_timeout_s: float = 300.0):
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"workers={workers}, timeout_s={timeout_s}: need >= 1 and > 0")
        self.size, self.timeout_s, self.start_timeout_s = workers, timeout_s, start_timeout_s
        self.preload = tuple(preload)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        # before multiprocessing's own exit hook (atexit runs last-registered first), which
        # would wait for ever on workers that ignore its SIGTERM
        atexit.register(self.close)

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self.preload), daemon=True,
                                 name="reward-worker")
        with shielded_spawn():
            proc.start()
        child.close()
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)
        w.conn.close()

    def _replace(self, w: _Worker, status: str, out: list, pending: deque) -> None:
        """``w`` timed out or died: its current task gets ``status``, the rest of its chunk
        goes back to the front of the queue, and a fresh worker takes its place."""
        if not w.ready:
            self._workers.remove(w)
            self._kill(w)
            raise PoolError(f"a reward worker exited during start-up (exit code "
                            f"{w.proc.exitcode}): run the reward function in a plain Python "
                            "process to see the import error")
        head = w.assigned.popleft()
        out[head] = status
        pending.extendleft(reversed(w.assigned))
        self._kill(w)
        self._workers[self._workers.index(w)] = self._spawn()

    def run(self, tasks: list[tuple], timeout_s: float | None = None) -> PoolResult:
        """Run every task; the first :class:`TaskError` is raised once the tasks already
        handed out have finished (so the workers stay clean for the next call).
        ``timeout_s`` overrides the pool's limit for this call."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        if limit <= 0:
            raise ValueError(f"timeout_s={limit}: need > 0")
        n = len(tasks)
        values, status = [None] * n, [None] * n
        pending, errors = deque(range(n)), []
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())
        chunk = max(1, min(16, n // (4 * self.size)))
        try:
            while pending or any(w.assigned for w in self._workers):
                if errors:
                    pending.clear()
                now = time.monotonic()
                for w in self._workers:
                    if w.ready and not w.assigned and pending:
                        take = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                        w.conn.send((sys.path, [(i, pickle.dumps(tasks[i])) for i in take]))
                        w.assigned.extend(take)
                        w.since = now
                deadlines = [w.since + limit for w in self._workers if w.assigned]
                deadlines += [w.started + self.start_timeout_s for w in self._workers
                              if not w.ready]
                if not deadlines:
                    break
                waitables = [w.conn for w in self._workers] + [w.proc.sentinel
                                                               for w in self._workers]
                wait(waitables, timeout=max(0.0, min(deadlines) - time.monotonic()))
                for w in list(self._workers):
                    self._drain(w, values, status, pending, errors)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.assigned and now - w.since > limit:
                        self._replace(w, TIMEOUT, status, pending)
                    elif not w.ready and now - w.started > self.start_timeout_s:
                        self._workers.remove(w)
                        self._kill(w)
                        raise PoolError(f"a reward worker took over {self.start_timeout_s:.0f} "
                                        "s to import its reward functions: check the machine "
                                        "is not overloaded")
        except BaseException:
            self.close()  # in-flight results must not leak into the next call
            raise
        if errors:
            raise errors[0]
        no_answer = sum(s == OK and v is None for s, v in zip(status, values, strict=True))
        return PoolResult(values, status, timeouts=status.count(TIMEOUT),
                          errors=status.count(CRASH), no_answer=no_answer)

    def _drain(self, w: _Worker, values: list, status: list, pending: deque,
               errors: list) -> None:
        """Read every message ``w`` has sent; replace it if it died."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    continue
                index = w.assigned.popleft()
                w.since = time.monotonic()
                if msg[0] == OK:
                    values[index], status[index] = msg[2], OK
                else:
                    errors.append(TaskError(index, *msg[2:]))
        except (EOFError, OSError):
            w.proc.join(5)  # the pipe closed: the process is exiting
        if not w.proc.is_alive():
            if w.assigned or not w.ready:
                self._replace(w, CRASH, status, pending)
            else:
                self._workers[self._workers.index(w)] = self._spawn()
                self._kill(w)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0  # one second for all to exit, then SIGKILL
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
