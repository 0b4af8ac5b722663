"""A synthetic, verifiable reasoning task for the CPU demo: multi-step arithmetic.

A problem is a left-to-right chain of additions and subtractions, e.g. ``12+7-5+3=?``; the
answer is an integer and a response is right when its last ``\\boxed{}`` holds it. Difficulty
levels differ in the number of operands and the number of digits per operand, so whether a
problem is solvable depends on the prompt (a prompt-only critic has something to learn).

The demonstration for supervised warm-up writes the running result one step a line and boxes
the last one::

    12+7=19
    19-5=14
    14+3=17
    \\boxed{17}

A configurable fraction of demonstrations per level is *corrupted* by one slip: by default a
"copy" slip, where a step's correct result is carried on into the next line (or the box) off by
a small amount and everything after it is computed correctly from the wrong value, so every
line's arithmetic is true but the boxed answer is wrong; or an "arithmetic" slip, where one
line's result itself is wrong. A model fitted to such data samples wrong answers at about that
rate while its most likely answer stays right: headroom that RL with a verifiable reward can
close. Copy slips keep every arithmetic fact in the data true, so the noise does not teach
wrong sums.

Held-out problems are chosen by a hash of the prompt text (with a fixed salt), never by a seed:
a problem is in the held-out split or it is not, so held-out problems can never appear in SFT
or RL data, whatever seeds or sizes the runs use. Every partial result is non-negative, and
every character of a prompt or response is in the character tokenizer's alphabet
(:data:`megatron_sppo.models.tiny.ALPHABET`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_sppo.errors import UserError

DATA_SOURCE = "arithmetic"
SPLITS = ("train", "heldout")
SLIPS = ("copy", "arithmetic")
HASH_SALT = "megatron_sppo.arithmetic.v1"


@dataclass(frozen=True)
class Level:
    """Problems with ``operands`` numbers of ``digits`` digits at most (0 .. 10**digits - 1);
    ``first`` = (low, high) draws the first number from that range instead."""

    operands: int
    digits: int
    ops: str = "+-"
    first: tuple[int, int] | None = None

    def __post_init__(self):
        if self.operands < 2 or not 1 <= self.digits <= 6:
            raise UserError(f"level operands={self.operands}, digits={self.digits}: need "
                            "operands >= 2 and 1 <= digits <= 6")
        if not self.ops or set(self.ops) - set("+-"):
            raise UserError(f"level ops={self.ops!r}: use a non-empty subset of '+-'")
        if self.first is not None and not 0 <= self.first[0] <= self.first[1] < 10 ** 6:
            raise UserError(f"level first={self.first}: need 0 <= low <= high < 10**6")

    @property
    def first_range(self) -> tuple[int, int]:
        return self.first if self.first is not None else (0, 10 ** self.digits - 1)

    @property
    def largest_value(self) -> int:
        """No running value (or one a slip carries on) exceeds this."""
        return self.first_range[1] + (self.operands - 1) * (10 ** self.digits - 1) + 10


# Default difficulty ladder of the CPU demo (level ids are 1-based). Chains of one-digit
# numbers are hard for a tiny model only until it has learnt to pick the next operand; after
# that a 5-operand chain is nearly as easy as a 3-operand one, and their errors in sampling
# come mostly from the corrupted demonstrations, which RL removes. Two two-digit operands
# (carries, borrows) stay hard much longer: level 4 keeps the success rate prompt-dependent
# after RL, so that a prompt-only critic has something to predict.
LEVELS: dict[int, Level] = {
    1: Level(operands=3, digits=1),
    2: Level(operands=4, digits=1),
    3: Level(operands=5, digits=1),
    4: Level(operands=2, digits=2),
}


# The graded task (``data.arithmetic_task=graded``) for the same warm start: two of the demo's
# chains, which RL soon solves, and a two-digit number plus or minus a one-digit one in
# ranges of growing size. The warm start has seen running values up to about 45 only inside
# chains of one-digit numbers, so its success falls with the range: held-out sampled pass@1
# (greedy) at the start, measured on 25 problems x 8 samples per level (AMD EPYC, 2 cores):
# 63% (100%), 44% (92%), 12% (56%), 12% (36%), 6% (4%), 5% (0%), 3% (~10%), 4% (12%). Which
# of the middle levels RL makes learnable, and when, is what prompt selection has to track.
GRADED_LEVELS: dict[int, Level] = {
    1: Level(operands=3, digits=1),
    2: Level(operands=5, digits=1),
    3: Level(operands=2, digits=1, first=(10, 19)),
    4: Level(operands=2, digits=1, first=(20, 29)),
    5: Level(operands=2, digits=1, first=(30, 39)),
    6: Level(operands=2, digits=1, first=(40, 49)),
    7: Level(operands=2, digits=1, first=(50, 99)),
    8: Level(operands=2, digits=2),
}

# the built-in tasks (``data.arithmetic_task``)
TASKS: dict[str, dict[int, Level]] = {"demo": LEVELS, "graded": GRADED_LEVELS}


@dataclass(frozen=True)
class Problem:
    """One problem: the numbers, the operators between them, and its difficulty level."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]
    level: int

    @property
    def prompt(self) -> str:
        """The user message, e.g. ``12+7-5+3=?`` (the chat template wraps it)."""
        text = str(self.numbers[0])
        for op, n in zip(self.ops, self.numbers[1:]):
            text += f"{op}{n}"
        return text + "=?"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(left, op, right, result)`` per step, evaluated left to right."""
        out, acc = [], self.numbers[0]
        for op, n in zip(self.ops, self.numbers[1:]):
            result = acc + n if op == "+" else acc - n
            out.append((acc, op, n, result))
            acc = result
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def record(self) -> dict:
        """The prompt-data record: ``{prompt, answer, level, data_source}``."""
        return {"prompt": self.prompt, "answer": str(self.answer), "level": self.level,
                "data_source": DATA_SOURCE}


def max_response_chars(levels: Mapping[int, Level] | None = None) -> int:
    """An upper bound on the length of any demonstration (corrupted ones included) of these
    levels: one token per character with the char tokenizer, so add 1 for the end-of-turn
    token to get a response-length limit that never truncates a demonstration-like answer."""
    longest = 0
    for spec in _levels(levels).values():
        width = len(str(spec.largest_value))  # the largest running value, slip included
        line = width + 1 + spec.digits + 1 + width  # "acc+n=result"
        longest = max(longest, (spec.operands - 1) * (line + 1) + len("\\boxed{}") + width)
    return longest


def _levels(levels: Mapping[int, Level] | None) -> dict[int, Level]:
    levels = dict(LEVELS if levels is None else levels)
    if not levels:
        raise UserError("no difficulty levels given: pass at least one Level")
    return levels


def sample_problem(rng: random.Random, level: int, levels: Mapping[int, Level] | None = None
                   ) -> Problem:
    """A uniformly drawn problem of ``level`` whose partial results are all >= 0."""
    spec = _levels(levels)[level]
    top = 10 ** spec.digits - 1
    while True:  # rejection keeps every partial result non-negative (>= 1/2 are accepted)
        numbers = (rng.randint(*spec.first_range),
                   *(rng.randint(0, top) for _ in range(spec.operands - 1)))
        ops = tuple(rng.choice(spec.ops) for _ in range(spec.operands - 1))
        problem = Problem(numbers, ops, level)
        if all(result >= 0 for *_, result in problem.steps()):
            return problem


def split_of(prompt: str, heldout_fraction: float = 0.2) -> str:
    """``"heldout"`` or ``"train"``: a fixed function of the prompt text alone (salted sha256)."""
    if not 0 < heldout_fraction < 1:
        raise UserError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    digest = hashlib.sha256(f"{HASH_SALT}:{prompt}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") < heldout_fraction * 2 ** 64 else "train"


def generate_problems(n: int, *, split: str, seed: int, levels: Mapping[int, Level] | None = None,
                      heldout_fraction: float = 0.2, unique: bool = True) -> list[Problem]:
    """``n`` problems of ``split``, levels balanced (counts differ by at most one), shuffled.

    Deterministic in ``(n, split, seed, levels, heldout_fraction, unique)``. ``unique`` makes
    the problems distinct (use it for evaluation sets); a level with too few problems in the
    split for that raises an error naming the level.
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    if n < 0:
        raise UserError(f"n={n} problems: use n >= 0")
    levels = _levels(levels)
    ids = sorted(levels)
    counts = {lv: n // len(ids) + (i < n % len(ids)) for i, lv in enumerate(ids)}
    rng = random.Random(f"{seed}:{split}:{heldout_fraction}")
    out: list[Problem] = []
    for lv in ids:
        seen: set[str] = set()
        got, tries = 0, 0
        while got < counts[lv]:
            tries += 1
            if tries > 200 * counts[lv] + 10_000:
                raise UserError(f"level {lv} ({levels[lv]}) has too few distinct {split} problems "
                                f"for {counts[lv]}: ask for fewer, or unique=False")
            problem = sample_problem(rng, lv, levels)
            text = problem.prompt
            if split_of(text, heldout_fraction) != split or (unique and text in seen):
                continue
            seen.add(text)
            out.append(problem)
            got += 1
    rng.shuffle(out)
    return out


def _corrupt_offset(rng: random.Random, steps: list[tuple[int, str, int, int]], at: int) -> int:
    """A small non-zero error for step ``at`` that keeps the rest of the chain non-negative."""
    later_min = min(result for *_, result in steps[at:])
    choices = [d for d in (-10, -2, -1, 1, 2, 10) if later_min + d >= 0]
    return rng.choice(choices)  # never empty: +1 always qualifies


def demonstration(problem: Problem, *, corrupt: bool = False, rng: random.Random | None = None,
                  slip: str = "copy") -> str:
    """The step-by-step response; ``corrupt`` puts one slip at a random step (needs ``rng``).

    slip="copy": a step's (right) result is carried on wrong by a small offset, into the next
    line or the box; every line's arithmetic stays true, only a transcription is off.
    slip="arithmetic": one line's result is wrong by a small offset; the following lines start
    from the wrong value. Either way the boxed answer is wrong by that offset.
    """
    if slip not in SLIPS:
        raise UserError(f"slip={slip!r}: use one of {', '.join(SLIPS)}")
    steps = problem.steps()
    offset, at = 0, len(steps)
    if corrupt:
        if rng is None:
            raise UserError("demonstration(corrupt=True) needs an rng")
        at = rng.randrange(len(steps))
        offset = _corrupt_offset(rng, steps, at)
    lines, acc = [], problem.numbers[0]
    for i, (_, op, n, _) in enumerate(steps):
        result = acc + n if op == "+" else acc - n
        if slip == "arithmetic" and i == at:
            result += offset
        lines.append(f"{acc}{op}{n}={result}")
        acc = result + (offset if slip == "copy" and i == at else 0)
    lines.append(f"\\boxed{{{acc}}}")
    return "\n".join(lines)


def _corrupt_fractions(corrupt: float | Mapping[int, float], ids: Sequence[int]) -> dict[int, float]:
    fractions = ({lv: float(corrupt) for lv in ids} if isinstance(corrupt, (int, float))
                 else {lv: float(corrupt.get(lv, 0.0)) for lv in ids})
    unknown = set() if isinstance(corrupt, (int, float)) else set(corrupt) - set(ids)
    if unknown:
        raise UserError(f"corrupt names levels {sorted(unknown)} that are not in {list(ids)}")
    bad = {lv: f for lv, f in fractions.items() if not 0 <= f <= 1}
    if bad:
        raise UserError(f"corrupt fractions {bad} must lie in [0, 1]")
    return fractions


def make_sft_records(n: int, *, seed: int, corrupt: float | Mapping[int, float] = 0.0,
                     slip: str = "copy", levels: Mapping[int, Level] | None = None,
                     heldout_fraction: float = 0.2, unique: bool = False) -> list[dict]:
    """``n`` supervised records from the train split: the prompt record plus ``response`` (the
    demonstration) and ``corrupted``.

    ``corrupt`` is one fraction for all levels or ``{level: fraction}``; exactly
    ``round(fraction * count)`` of each level's demonstrations are corrupted.
    """
    levels = _levels(levels)
    fractions = _corrupt_fractions(corrupt, sorted(levels))
    problems = generate_problems(n, split="train", seed=seed, levels=levels,
                                 heldout_fraction=heldout_fraction, unique=unique)
    rng = random.Random(f"{seed}:sft-corruption")
    wrong: set[int] = set()
    for lv in sorted(levels):
        idx = [i for i, p in enumerate(problems) if p.level == lv]
        wrong.update(rng.sample(idx, round(fractions[lv] * len(idx))))
    records = []
    for i, p in enumerate(problems):
        bad = i in wrong
        records.append({**p.record(), "response": demonstration(p, corrupt=bad, rng=rng, slip=slip),
                        "corrupted": bad})
    return records


def make_prompt_records(n: int, *, split: str, seed: int,
                        levels: Mapping[int, Level] | None = None,
                        heldout_fraction: float = 0.2, unique: bool | None = None) -> list[dict]:
    """``n`` prompt records ``{prompt, answer, level, data_source}`` for RL or evaluation.

    Held-out records are distinct problems unless ``unique=False``; train records may repeat.
    """
    unique = split == "heldout" if unique is None else unique
    return [p.record() for p in generate_problems(n, split=split, seed=seed, levels=levels,
                                                  heldout_fraction=heldout_fraction,
                                                  unique=unique)]


_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def boxed_answer(response: str) -> str | None:
    """The integer in the last ``\\boxed{...}`` of ``response`` (None if there is none)."""
    found = _BOXED.findall(response)
    return found[-1] if found else None


def is_correct(response: str, answer: str | int) -> bool:
    """The task's own check: the last boxed integer equals the answer."""
    got = boxed_answer(response)
    return got is not None and int(got) == int(answer)


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """One JSON object a line (UTF-8), parent folders created; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
