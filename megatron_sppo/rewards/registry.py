"""Scoring a batch of responses: a reward function per sample, chosen by config and routed
by the sample's ``data_source`` (as verl's ``default_compute_score`` does), run in the
time-limited worker pool.

A reward function is ``fn(prompt, response, ground_truth, metadata)`` returning one of

- ``None``: the response states no answer (reward ``no_answer``);
- ``True``/``False``: a verdict, paid the configured ``correct``/``incorrect`` values;
- a number: the reward itself (the function did its own shaping);
- a dict: ``score`` (the reward, as a number) and/or ``correct`` (the verdict), optionally
  ``format_ok`` (False costs ``format_penalty``) and any other numeric metrics, averaged
  into ``reward/<name>``.

Built in: ``math`` (last boxed answer, math-verify), ``math_answer`` (the last "Answer:"
line, which DAPO-Math-17k's prompt asks for, else the last box), ``math_auto`` (whichever of
the two the sample's prompt asks for) and ``arithmetic`` (the demo task). Samples with
``data_source == "math_dapo"`` use ``math_auto`` by default when the main function is
``math``: that data_source names both DAPO-Math-17k as published (an "Answer:" line) and the
SPPO authors' rewrite of it (a boxed answer), so only the prompt tells which check is right.
Anything else is ``package.module:function``, imported now so a typo fails before training.

Every result carries two numbers: the reward the advantage uses, and the 0/1 correctness
the SPPO critic learns (the verdict, or for a bare number ``score >= 1``), which stays 0/1
whatever the shaping. A timed-out or crashed check scores as incorrect and is counted. An
exception raised by a reward function stops the step with the sample's index and data_source.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import numbers
import pickle
import random
from dataclasses import dataclass, field
from typing import NamedTuple

from megatron_sppo.config.schema import RewardConfig
from megatron_sppo.errors import UserError
from megatron_sppo.rewards.math import math_verdict
from megatron_sppo.rewards.pool import CRASH, OK, TaskError, WorkerPool

log = logging.getLogger(__name__)

DEFAULT_ROUTES = {"math_dapo": "math_auto"}
RESERVED_KEYS = ("score", "correct", "format_ok")


class RewardFunctionError(UserError):
    """A reward function raised or returned something unusable, on one sample."""

    def __init__(self, message: str, index: int, data_source: str, worker_traceback: str = ""):
        super().__init__(message)
        self.index, self.data_source, self.worker_traceback = index, data_source, worker_traceback


def arithmetic_verdict(prompt, response: str, ground_truth, metadata=None) -> bool | None:
    """The demo task's check: the last boxed integer equals the answer."""
    from megatron_sppo.data.arithmetic import boxed_answer

    got = boxed_answer(response)
    return None if got is None else int(got) == int(ground_truth)


def builtin_functions(cfg: RewardConfig) -> dict:
    think = cfg.require_think_close
    return {"math": functools.partial(math_verdict, mode="boxed", require_think_close=think),
            "math_answer": functools.partial(math_verdict, mode="answer",
                                             require_think_close=think),
            "math_auto": functools.partial(math_verdict, mode="prompt",
                                           require_think_close=think),
            "arithmetic": arithmetic_verdict}


def load_reward_function(spec: str, cfg: RewardConfig | None = None):
    """A built-in name or ``package.module:function`` (the function may be an attribute
    path, ``module:Class.method``); UserError naming the fix if it cannot be loaded."""
    builtins = builtin_functions(cfg or RewardConfig())
    if spec in builtins:
        return builtins[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"reward function {spec!r}: use one of {', '.join(builtins)} or "
                        "package.module:function")
    try:
        fn = functools.reduce(getattr, name.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward function {spec!r} cannot be loaded ({type(e).__name__}: {e}): "
                        "check the module is on PYTHONPATH and defines the function") from None
    if not callable(fn):
        raise UserError(f"reward function {spec!r} is a {type(fn).__name__}, not a function")
    try:
        pickle.dumps(fn)  # it travels to the worker processes by reference
    except Exception as e:
        raise UserError(f"reward function {spec!r} cannot be sent to worker processes ({e}): "
                        "define it at module level, not as a lambda or closure") from None
    return fn


class _Outcome(NamedTuple):
    reward: float
    correct: float
    status: str  # correct, incorrect, no_answer, timeout, error
    format_ok: bool | None = None
    extra: dict = {}


def _label(correct: bool) -> str:
    return "correct" if correct else "incorrect"


@dataclass
class Scored:
    """Per sample, in ``samples[prompt][k]`` order flattened: the reward (for the advantage),
    the 0/1 correctness (for the critic) and the status (``correct``, ``incorrect``,
    ``no_answer``, ``timeout``, ``error``); ``metrics`` are the batch's counts and means."""

    rewards: list[float]
    correctness: list[float]
    status: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


COUNT_METRICS = ("reward/timeouts", "reward/errors")


def combine_scored(parts: list[Scored], keep: list[list[int]]) -> Scored:
    """One :class:`Scored` from several scoring calls (dynamic sampling's rounds): the
    samples at ``keep[i]`` of ``parts[i]``, in that order; the metrics cover every sample
    scored (counts summed, rates and means weighted by each call's samples)."""
    out = Scored([], [], [], {})
    weights: dict[str, int] = {}
    for part, rows in zip(parts, keep, strict=True):
        out.rewards += [part.rewards[i] for i in rows]
        out.correctness += [part.correctness[i] for i in rows]
        out.status += [part.status[i] for i in rows]
        n = len(part.rewards)
        for key, value in part.metrics.items():
            w = 1 if key in COUNT_METRICS else n
            out.metrics[key] = out.metrics.get(key, 0.0) + w * value
            weights[key] = weights.get(key, 0) + w
    for key in out.metrics:
        if key not in COUNT_METRICS:
            out.metrics[key] /= max(weights[key], 1)
    return out


class RewardScorer:
    """Scores responses against their prompt records (``prompt``, ``ground_truth``,
    ``data_source``, ``metadata``, ``index``). ``cfg``: a :class:`RewardConfig` or any object
    with its fields; ``routes`` (data_source -> function) extend and override ``cfg.routes``.
    Starts its own worker pool (closed by :meth:`close`) unless given one to share, e.g. by
    evaluation with the trainer's workers; a shared pool keeps its own time limit."""

    def __init__(self, cfg=None, routes: dict | None = None, pool: WorkerPool | None = None):
        self.cfg = cfg if cfg is not None else RewardConfig()
        self.routes = dict(DEFAULT_ROUTES) if self.cfg.function == "math" else {}
        self.routes.update(self.cfg.routes or {})
        self.routes.update(routes or {})
        specs = {self.cfg.function, *self.routes.values()}
        self.functions = {spec: load_reward_function(spec, self.cfg) for spec in sorted(specs)}
        self.pool, self._owns_pool = pool, pool is None

    def spec_for(self, data_source: str | None) -> str:
        return self.routes.get(data_source or "", self.cfg.function)

    def _pool(self) -> WorkerPool:
        if self.pool is None:
            self.pool = WorkerPool(self.cfg.workers, self.cfg.timeout_s,
                                   preload=tuple(self.functions.values()))
        return self.pool

    def score(self, records, samples) -> Scored:
        """``samples[i]``: the responses (objects with ``.text``) to ``records[i]``."""
        jobs, tasks = [], []
        for record, per_prompt in zip(records, samples, strict=True):
            spec = self.spec_for(getattr(record, "data_source", None))
            for sample in per_prompt:
                jobs.append((record, spec))
                tasks.append((self.functions[spec],
                              (record.prompt, sample.text, record.ground_truth,
                               dict(getattr(record, "metadata", None) or {}))))
        if not tasks:
            return Scored([], [], [], {})
        try:
            result = self._pool().run(tasks)
        except TaskError as e:
            record, spec = jobs[e.index]
            raise self._error(e.index, record, spec, f"raised {e.kind}: {e.message} at {e.where}",
                              e.worker_traceback) from None
        rewards, correctness, status, format_ok, extras = [], [], [], [], {}
        for i, (value, state) in enumerate(zip(result.values, result.status, strict=True)):
            if state == OK:
                out = self._interpret(i, jobs[i], value)
            else:  # the check could not finish: no credit, counted in the metrics
                out = _Outcome(self.cfg.incorrect, 0.0, "error" if state == CRASH else state)
            reward = out.reward
            if out.format_ok is not None:
                format_ok.append(out.format_ok)
                reward -= 0.0 if out.format_ok else self.cfg.format_penalty
            for key, v in out.extra.items():
                extras.setdefault(key, []).append(v)
            rewards.append(float(reward))
            correctness.append(out.correct)
            status.append(out.status)
        if self.cfg.shuffle:  # rewards and correctness only: status stays the truth
            order = list(range(len(rewards)))
            digest = hashlib.blake2b("\x00".join(t[1][1] for t in tasks).encode(), digest_size=8)
            random.Random(digest.digest()).shuffle(order)
            rewards = [rewards[i] for i in order]
            correctness = [correctness[i] for i in order]
        n = len(tasks)
        metrics = {"reward/timeouts": float(result.timeouts),
                   "reward/errors": float(result.errors),
                   "reward/no_answer_rate": status.count("no_answer") / n}
        if format_ok:
            metrics["reward/format_violation_rate"] = format_ok.count(False) / len(format_ok)
        metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in extras.items()})
        return Scored(rewards, correctness, status, metrics)

    def _interpret(self, i: int, job, value) -> _Outcome:
        """One return value of a reward function, by the rules in the module docstring."""
        c = self.cfg
        if value is None:
            return _Outcome(c.no_answer, 0.0, "no_answer")
        if isinstance(value, bool):
            return _Outcome(c.correct if value else c.incorrect, float(value), _label(value))
        if isinstance(value, numbers.Real):
            return _Outcome(float(value), float(value >= 1.0), _label(value >= 1.0))
        if not isinstance(value, dict):
            raise self._error(i, *job, f"returned a {type(value).__name__}; return a number, "
                              "a bool, None or a dict with 'score' or 'correct'")
        score, verdict = value.get("score"), value.get("correct")
        extra = {k: v for k, v in value.items() if k not in RESERVED_KEYS}
        bad = [k for k, v in extra.items()
               if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            raise self._error(i, *job, f"returned non-numeric metrics {bad}; extra dict "
                              "entries must be numbers")
        extra = {k: float(v) for k, v in extra.items()}
        fmt = None if value.get("format_ok") is None else bool(value["format_ok"])
        if score is None and verdict is None:
            if "score" not in value and "correct" not in value:
                raise self._error(i, *job, "returned a dict without 'score' or 'correct' "
                                  f"(keys {sorted(value)})")
            return _Outcome(c.no_answer, 0.0, "no_answer", None, extra)
        if score is None:
            correct = bool(verdict)
            return _Outcome(c.correct if correct else c.incorrect, float(correct),
                            _label(correct), fmt, extra)
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise self._error(i, *job, f"returned score={score!r}; it must be a number")
        correct = bool(verdict) if verdict is not None else score >= 1.0
        return _Outcome(float(score), float(correct), _label(correct), fmt, extra)

    def _error(self, i: int, record, spec: str, what: str, tb: str = "") -> RewardFunctionError:
        if tb:
            log.error("reward function %s failed on sample %d:\n%s", spec, i, tb)
        source = getattr(record, "data_source", None)
        message = (f"reward function {spec} {what} on sample {i} (dataset index "
                   f"{getattr(record, 'index', '?')}, data_source {source!r}): fix the function "
                   "or route this data_source to another one")
        return RewardFunctionError(" ".join(message.split()), i, source, tb)

    def close(self) -> None:
        if self.pool is not None and self._owns_pool:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
