"""Scoring a step's responses: reward functions chosen by config and routed by each
sample's ``data_source``, run in a worker pool with a time limit per check so that a
pathological expression cannot hang or crash training (a timeout scores as no success and
is counted).

A reward function is ``fn(prompt, response, ground_truth, metadata) -> float | dict`` (a
dict holds ``score`` plus extra metrics). Built in: ``math`` (boxed answer, math-verify)
and ``arithmetic`` (the demo task's integer check); anything else is imported from
``package.module:function``. The scorer returns both the reward (shaped by the configured
correct/incorrect/no-answer values) and the 0/1 correctness the SPPO critic learns.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import random
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from megatron_sppo.errors import UserError

# math-verify warns on every call that its own timeouts are off: the pool enforces them
logging.getLogger("math_verify").setLevel(logging.ERROR)

NO_ANSWER = None  # a reward function's way of saying "no answer found"


def _math(prompt, response, ground_truth, metadata):
    from megatron_sppo.rewards.math import check_answer, extract_answer, parse_ground_truth

    answer = extract_answer(response)
    if answer is None:
        return NO_ANSWER
    return float(check_answer(answer, parse_ground_truth(str(ground_truth))))


def _arithmetic(prompt, response, ground_truth, metadata):
    from megatron_sppo.data.arithmetic import boxed_answer

    got = boxed_answer(response)
    return NO_ANSWER if got is None else float(int(got) == int(ground_truth))


BUILTIN = {"math": _math, "arithmetic": _arithmetic}


def load_reward_function(spec: str):
    """A built-in name or ``package.module:function``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise UserError(f"reward function {spec!r}: use one of {', '.join(BUILTIN)} or "
                        "package.module:function")
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward function {spec!r} cannot be imported ({e}): check the module "
                        "is on PYTHONPATH and defines the function") from None
    if not callable(fn):
        raise UserError(f"reward function {spec!r} is not callable")
    return fn


def _call(fn_spec: str, prompt, response, ground_truth, metadata):
    """Runs in a worker: (score or None, extra metrics)."""
    out = load_reward_function(fn_spec)(prompt, response, ground_truth, metadata)
    if isinstance(out, dict):
        if "score" not in out:
            raise ValueError(f"returned a dict without 'score': {sorted(out)}")
        extra = {k: float(v) for k, v in out.items() if k != "score"}
        return (None if out["score"] is None else float(out["score"])), extra
    return (None if out is None else float(out)), {}


@dataclass
class Scored:
    """Per sample: reward (for the advantage) and 0/1 correctness (for the critic)."""

    rewards: list[float]
    correctness: list[float]
    metrics: dict = field(default_factory=dict)


class RewardScorer:
    """Scores ``samples[prompt][k]`` against their prompt records (``prompt``,
    ``ground_truth``, ``data_source``, ``metadata``). ``cfg`` is the config's reward section;
    ``routes`` maps a data_source to a function spec (default: ``cfg.function``)."""

    def __init__(self, cfg, routes: dict[str, str] | None = None):
        self.cfg = cfg
        self.routes = dict(routes or {})
        for spec in {cfg.function, *self.routes.values()}:
            load_reward_function(spec)  # fail now, not at the first step
        self.pool = None

    def _spec(self, record) -> str:
        return self.routes.get(getattr(record, "data_source", None) or "", self.cfg.function)

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.cfg.workers,
                                            mp_context=mp.get_context("spawn"))
        return self.pool

    def _restart(self) -> None:
        if self.pool is not None:
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.kill()
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None

    def _run(self, jobs: list[tuple]) -> tuple[list, dict]:
        """jobs: (index, spec, prompt, response, ground_truth, metadata)."""
        counts = {"timeouts": 0, "crashes": 0}
        results: list = [None] * len(jobs)
        if all(spec in BUILTIN and spec == "arithmetic" for _, spec, *_ in jobs):
            for i, (_, spec, *args) in enumerate(jobs):  # cheap and safe: no pool
                results[i] = _call(spec, *args)
            return results, counts
        futures = [self._pool().submit(_call, spec, *args) for _, spec, *args in jobs]
        for i, future in enumerate(futures):
            index, spec = jobs[i][0], jobs[i][1]
            try:
                results[i] = future.result(timeout=self.cfg.timeout_s)
            except FutureTimeout:
                counts["timeouts"] += 1
                results[i] = (NO_ANSWER, {})
                self._restart()  # the stuck worker must die; resubmit the rest
                return self._resume(jobs, results, i + 1, counts)
            except BrokenProcessPool:
                counts["crashes"] += 1
                results[i] = (NO_ANSWER, {})
                self._restart()
                return self._resume(jobs, results, i + 1, counts)
            except Exception as e:  # user code raised: report it, never swallow
                raise UserError(f"reward function {spec} failed on sample {index}: "
                                f"{type(e).__name__}: {e}") from e
        return results, counts

    def _resume(self, jobs, results, start, counts):
        rest, more = self._run(jobs[start:])
        results[start:] = rest
        return results, {k: counts[k] + more[k] for k in counts}

    def score(self, records, samples) -> Scored:
        jobs = []
        for p, (record, per_prompt) in enumerate(zip(records, samples)):
            for s in per_prompt:
                jobs.append((len(jobs), self._spec(record), record.prompt, s.text,
                             record.ground_truth, getattr(record, "metadata", None) or {}))
        results, counts = self._run(jobs)
        rewards, correctness, extras = [], [], {}
        c = self.cfg
        for score, extra in results:
            if score is None:
                rewards.append(c.no_answer)
                correctness.append(0.0)
            else:
                correct = score >= 1.0
                rewards.append(c.correct if correct else c.incorrect)
                correctness.append(1.0 if correct else 0.0)
            for k, v in extra.items():
                extras.setdefault(k, []).append(v)
        if c.shuffle:  # the control run: outcomes carry no information about responses
            order = list(range(len(rewards)))
            random.Random(sum(len(j[3]) for j in jobs) + len(jobs)).shuffle(order)
            rewards = [rewards[i] for i in order]
            correctness = [correctness[i] for i in order]
        metrics = {"reward_timeouts": counts["timeouts"], "reward_crashes": counts["crashes"],
                   "no_answer_fraction": sum(r is None for r, _ in results) / max(len(jobs), 1),
                   **{f"reward/{k}": sum(v) / len(v) for k, v in extras.items()}}
        return Scored(rewards, correctness, metrics)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
