"""The math reward: the last boxed answer of the response's final part, checked for
mathematical equivalence with the ground truth through math-verify.

Extraction follows the R1 convention: only the text after the last ``</think>`` counts when
there is one (R1-style templates open the think block in the prompt, so the response holds
only the closing tag); with ``require_think_close`` a response that never closes its think
block has no answer. ``\\boxed{...}`` (nested braces), ``\\boxed 5`` and ``\\fbox{...}`` are
recognised; ``answer_mode="answer"`` reads the last "Answer: ..." line instead.
"""

from __future__ import annotations

import re

END_THINK = "</think>"
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_LINE = re.compile(r"(?im)^\s*\**answer\**\s*[:：]\s*(.+?)\s*$")
_UNITS = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:degrees?|cm|m|km|inches|feet|units?|"
                    r"dollars?|cents?|hours?|minutes?|seconds?|days?)\s*\}|\^\s*\{?\\circ\}?|°")


def final_part(response: str, require_think_close: bool = False) -> str | None:
    if END_THINK in response:
        return response.rsplit(END_THINK, 1)[1]
    return None if require_think_close else response


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (balanced braces) or of
    ``\\boxed x`` (up to whitespace or ``$``)."""
    matches = list(_BOX.finditer(text))
    for m in reversed(matches):
        start = m.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[start + 1:i].strip()
            continue  # unbalanced: try an earlier box
        bare = re.match(r"[^\s$]+", text[start:])
        if bare and m.group(0).endswith(" "):
            return bare.group(0)
    return None


def extract_answer(response: str, mode: str = "boxed",
                   require_think_close: bool = False) -> str | None:
    part = final_part(response, require_think_close)
    if part is None:
        return None
    if mode == "answer":
        lines = _ANSWER_LINE.findall(part)
        return lines[-1].strip().rstrip(".") if lines else None
    return last_boxed(part)


def normalize(answer: str) -> str:
    """Strip what math-verify should not compare: units, degree signs, ``\\%``, ``$``."""
    answer = _UNITS.sub("", answer)
    return answer.replace("\\%", "").replace("%", "").replace("$", "").strip()


def parse_ground_truth(ground_truth: str):
    """Parse once per problem; math-verify reads it as LaTeX (wrapped in a box so a bare
    expression is taken whole)."""
    from math_verify import parse

    return parse(f"\\boxed{{{normalize(ground_truth)}}}", parsing_timeout=None)


def check_answer(answer: str, gold) -> bool:
    """Equivalence of an extracted answer with a parsed ground truth. Timeouts are the
    caller's business (the pool), so math-verify's own signal timers are off: they only work
    in a main thread."""
    from math_verify import parse, verify

    pred = parse(f"\\boxed{{{normalize(answer)}}}", parsing_timeout=None)
    return bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 when the last boxed answer equals ``ground_truth`` mathematically, else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if check_answer(answer, parse_ground_truth(ground_truth)) else 0.0
