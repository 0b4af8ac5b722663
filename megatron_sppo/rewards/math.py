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
- ``mode="answer"``: the last "Answer: ..." line, as DAPO-Math-17k's prompt asks for.

Equivalence is math-verify's ``verify`` on both sides parsed as LaTeX (numbers, fractions,
percentages, units, intervals, sets, tuples, matrices, expressions), after a small
normalisation of what it does not cover (degree signs, ``%`` without a backslash, thin-space
thousands separators). The ground truth is parsed once per problem (LRU cache); one that
math-verify cannot parse is compared as text and reported (``gt_unparsed``).

math-verify's own timeouts are SIGALRM-based (main thread only, and unable to interrupt a
huge integer power inside C), so they are off here: the worker pool
(:mod:`megatron_sppo.rewards.pool`) enforces the time limit by killing the worker.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import NamedTuple

from math_verify import parse, verify

# Every call with timeouts off logs a warning; the pool enforces the limits instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

END_THINK = "</think>"
MODES = ("boxed", "answer")

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
    return last_boxed(part) if mode == "boxed" else _last_answer_line(part)


def count_answer_marks(response: str, mode: str = "boxed") -> int:
    """How many answers the final part states (boxes or "Answer:" lines): the format check
    of the optional format penalty is that there is exactly one."""
    part = final_part(response) or ""
    if mode == "boxed":
        return len(_BOX.findall(part))
    return sum(1 for m in _ANSWER.finditer(part) if m.group(1).strip())


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
    answer, else ``{"correct", "format_ok", "gt_unparsed"}``."""
    answer = extract_answer(response, mode, require_think_close)
    if answer is None:
        return None
    gold = parse_ground_truth(str(ground_truth))
    return {"correct": check_answer(answer, gold),
            "format_ok": count_answer_marks(response, mode) == 1,
            "gt_unparsed": 0.0 if gold.parsed else 1.0}


def math_reward(response: str, ground_truth: str, *, mode: str = "boxed",
                require_think_close: bool = False) -> float:
    """1.0 when the response's final answer equals ``ground_truth`` mathematically, else 0.0.

    One sample, in this process and without a time limit: for training and evaluation use
    :class:`megatron_sppo.rewards.RewardScorer`, which scores batches in the time-limited pool.
    """
    verdict = math_verdict(None, response, ground_truth, mode=mode,
                           require_think_close=require_think_close)
    return 1.0 if verdict and verdict["correct"] else 0.0
