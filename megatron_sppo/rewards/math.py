"""The math reward: the final answer of a response, checked for mathematical equivalence with
the ground truth through math-verify.

Extraction follows the R1 convention: when the response holds a ``</think>``, only the text
after the last one counts (R1-style chat templates open the think block in the prompt, so the
response holds only the closing tag). With ``require_think_close`` (think-mode models) a
response that never closes its think block has no answer: a model must not be paid for an
answer it only mumbled while thinking. In that final part the answer is

- ``mode="boxed"``: the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces, escaped
  ``\\{ \\}``), or ``\\boxed 5`` without braces. An unbalanced last box (a truncated answer)
  is no answer; so is an empty box.
- ``mode="answer"``: the last "Answer: ..." line, as DAPO-Math-17k's prompt asks for; a
  response without one is read as in boxed mode (its last box).
- ``mode="prompt"`` (reward functions only): the mode the prompt asks for. DAPO-Math-17k as
  published ends with 'Remember to put your answer on its own line after "Answer:".', the
  SPPO authors' rewrite of it (their ``dapo-math-17k_dedup.parquet``) and every other boxed
  prompt with "... within \\boxed{}.": whichever of the two the prompt mentions last decides.

Equivalence is math-verify's ``verify`` on both sides parsed as LaTeX (numbers, fractions,
percentages, units, intervals, sets, tuples, matrices, expressions), after a small
normalisation of what it does not cover (degree signs, ``%`` without a backslash, thin-space
thousands separators). The ground truth is parsed once per problem (LRU cache); one that
math-verify cannot parse is compared as text and reported (``gt_unparsed``).

math-verify's own timeouts are SIGALRM-based (main thread only, and unable to interrupt a
huge integer power inside C), so they are off here: the worker pool
(:mod:`megatron_sppo.rewards.pool`) enforces the time limit by killing the worker. The
one-sample :func:`math_reward` does the same through a worker pool of its own, started on
first use and shared by every later call.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import threading
from typing import NamedTuple

from math_verify import parse, verify

from megatron_sppo.rewards.pool import WorkerPool, in_worker

# Every call with timeouts off logs a warning; the pool enforces the limits instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

END_THINK = "</think>"
MODES = ("boxed", "answer")
TIMEOUT_S = 5.0  # the one-sample limit; RewardConfig.timeout_s has the same default

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER = re.compile(r"(?<![A-Za-z])answer\**\s*[:：]\**[ \t]*([^\n]*)", re.IGNORECASE)
_DEGREE = re.compile(r"°|\\textdegree|\\degree(?![A-Za-z])")
_BARE_PERCENT = re.compile(r"(?<!\\)%")
_THIN_THOUSANDS = re.compile(r"(?<=\d)\\[,;:! ](?=\d{3}(?!\d))")
_SPACES = re.compile(r"\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def final_part(response: str, require_think_close: bool = False) -> str | None:
    """The text the answer is read from; None when the think block never closes and
    ``require_think_close`` says that means no answer."""
    if END_THINK in response:
        return response.rsplit(END_THINK, 1)[1]
    return None if require_think_close else response


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if unbalanced.
    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def unclosed_brace(text: str) -> bool:
    """True when a brace group of ``text`` never closes (escaped ``\\{``/``\\}`` do not
    count): a ground truth cut there, like Minerva-Math's ``\\frac{dM``, matches no answer."""
    depth, i = 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return depth > 0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed``/``\\fbox`` in ``text``; None if there is none, it is
    empty, or its braces never close."""
    marks = list(_BOX.finditer(text))
    if not marks:
        return None
    start = marks[-1].end()
    while start < len(text) and text[start] in " \t":
        start += 1
    if start < len(text) and text[start] == "{":
        content = _braced(text, start)
    else:  # "\boxed 5": the argument runs to whitespace or the closing "$"
        content = re.match(r"[^\s$]*", text[start:]).group(0)
    content = (content or "").strip()
    return content or None


def _last_answer_line(text: str) -> str | None:
    lines = [m.group(1).strip() for m in _ANSWER.finditer(text)]
    lines = [line for line in lines if line]
    if not lines:
        return None
    line = lines[-1]
    if _BOX.search(line):
        return last_boxed(line)
    line = line.strip().rstrip(".").strip()
    if len(line) >= 2 and line.startswith("$") and line.endswith("$"):
        line = line.strip("$").strip()
    return line or None


def extract_answer(response: str, mode: str = "boxed",
                   require_think_close: bool = False) -> str | None:
    """The response's final answer as written (before normalisation); None if it has none."""
    if mode not in MODES:
        raise ValueError(f"answer mode {mode!r}: use one of {MODES}")
    part = final_part(response, require_think_close)
    if part is None:
        return None
    return (mode == "answer" and _last_answer_line(part)) or last_boxed(part)


def count_answer_marks(response: str, mode: str = "boxed") -> int:
    """How many answers the final part states (boxes, or "Answer:" lines when there are
    any in answer mode): the format check of the optional format penalty is that there is
    exactly one."""
    part = final_part(response) or ""
    lines = sum(1 for m in _ANSWER.finditer(part) if m.group(1).strip())
    return lines if mode == "answer" and lines else len(_BOX.findall(part))


def prompt_text(prompt) -> str:
    """A prompt's text: the string itself, or its chat messages' contents."""
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return prompt if isinstance(prompt, str) else ""


def requested_mode(prompt) -> str:
    """``answer`` when the prompt's last answer instruction is DAPO's "Answer:" line,
    ``boxed`` otherwise (also when it names neither)."""
    text = prompt_text(prompt)
    return "answer" if text.rfind("Answer:") > text.rfind("\\boxed") else "boxed"


def normalize(answer: str) -> str:
    """What math-verify does not normalise itself: degree signs, a bare ``%``, thin-space
    thousands separators, a trailing full stop, ``\\varnothing``."""
    answer = _DEGREE.sub(r"^\\circ", answer)
    answer = _BARE_PERCENT.sub(r"\\%", answer)
    answer = _THIN_THOUSANDS.sub("", answer)
    answer = answer.replace("\\varnothing", "\\emptyset")
    return answer.strip().rstrip(".").strip()


def _compact(text: str) -> str:
    """Text form for answers math-verify cannot parse: no wrappers, spaces or case."""
    return _SPACES.sub("", _TEXT_WRAPPER.sub(r"\1", text)).strip("$").lower()


def _parse(text: str) -> list:
    return parse(f"\\boxed{{{text}}}", parsing_timeout=None)


class Gold(NamedTuple):
    """A parsed ground truth: math-verify's parse (empty when it failed) and the text."""

    parsed: list
    text: str


@functools.lru_cache(maxsize=4096)
def parse_ground_truth(ground_truth: str) -> Gold:
    """Parse once per problem: the k samples of a prompt share the cached parse."""
    text = normalize(str(ground_truth))
    return Gold(_parse(text) if text else [], text)


def check_answer(answer: str, gold: Gold) -> bool:
    """Mathematical equivalence of an extracted answer with a parsed ground truth; text
    equality where either side does not parse."""
    text = normalize(answer)
    pred = _parse(text) if text else []
    if gold.parsed and pred:
        return bool(verify(gold.parsed, pred, timeout_seconds=None))
    return bool(text) and _compact(text) == _compact(gold.text)


def math_verdict(prompt, response: str, ground_truth, metadata=None, *, mode: str = "boxed",
                 require_think_close: bool = False) -> dict | None:
    """The built-in reward function (registry signature): None when the response has no
    answer, else ``{"correct", "format_ok", "gt_unparsed"}``. ``mode="prompt"`` reads the
    answer the way ``prompt`` asks for it (:func:`requested_mode`)."""
    if mode == "prompt":
        mode = requested_mode(prompt)
    answer = extract_answer(response, mode, require_think_close)
    if answer is None:
        return None
    gold = parse_ground_truth(str(ground_truth))
    return {"correct": check_answer(answer, gold),
            "format_ok": count_answer_marks(response, mode) == 1,
            "gt_unparsed": 0.0 if gold.parsed else 1.0}


_one_sample = {"pool": None, "pid": None, "lock": threading.Lock()}


def _one_sample_pool() -> WorkerPool:
    """One worker, started on first use (its imports take seconds) and closed at exit; a
    forked child starts its own (the parent's pipes are not its to use)."""
    if _one_sample["pool"] is None or _one_sample["pid"] != os.getpid():
        pool = WorkerPool(workers=1, timeout_s=TIMEOUT_S, preload=(math_verdict,))
        atexit.register(pool.close)
        _one_sample.update(pool=pool, pid=os.getpid())
    return _one_sample["pool"]


def math_reward(response: str, ground_truth: str, *, mode: str = "boxed",
                require_think_close: bool = False, timeout_s: float = TIMEOUT_S) -> float:
    """1.0 when the response's final answer equals ``ground_truth`` mathematically, else 0.0.

    One sample, checked in a worker process with the scorer's limit: a check that runs past
    ``timeout_s`` seconds scores 0.0 (its worker is killed and replaced). Called by a user
    reward function that a :class:`megatron_sppo.rewards.RewardScorer` runs, it checks in
    place: the scorer's worker is already timed. Batches go faster through the scorer and its
    pool of several workers.
    """
    if mode not in MODES:
        raise ValueError(f"answer mode {mode!r}: use one of {MODES}")
    check = functools.partial(math_verdict, mode=mode, require_think_close=require_think_close)
    if in_worker():
        verdict = check(None, response, ground_truth)
    else:
        with _one_sample["lock"]:
            result = _one_sample_pool().run([(check, (None, response, ground_truth))],
                                            timeout_s)
        verdict = result.values[0]
    return 1.0 if verdict and verdict["correct"] else 0.0
