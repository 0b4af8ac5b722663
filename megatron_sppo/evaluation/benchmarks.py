"""The paper's evaluation sets, read from local files in their public layouts (nothing is
downloaded): AIME24, AIME25, AMC23, MATH500 and Minerva-Math.

Their common releases name fields differently, so a problem is read from the first present of
``problem``/``question`` (any case) and its answer from ``answer`` (any case) or, failing
that, the last ``\\boxed{}`` of ``solution``:

- AIME24 ``HuggingFaceH4/aime_2024``: id, problem, solution, answer, url, year (30);
  ``Maxwell-Jia/AIME_2024``: ID, Problem, Solution, Answer.
- AIME25 ``math-ai/aime25``: problem, answer, id (30).
- AMC23 ``math-ai/amc23``: id, question, answer, url (40).
- MATH500 ``HuggingFaceH4/MATH-500``: problem, solution, answer, subject, level, unique_id (500).
- Minerva-Math ``math-ai/minervamath``: question, answer; the original release has problem
  and solution with a boxed answer (272).
- any of them in verl's parquet layout (prompt messages, reward_model.ground_truth), as the
  SPPO authors publish theirs (``data/offline_eval/*.parquet`` in 1BIMU/SPPO: AIME24 repeated
  8 times, 240 rows; AIME25; AMC23; MATH500; Minerva-Math with 68 of its 272 ground truths
  cut at a brace). Their prompts already carry the instruction and are used as given.

A ground truth cut at a brace is reported when the file is loaded and counted in the
results (``truncated_ground_truths``): no answer can match it, so it caps the benchmark's score.

Files are JSONL, JSON, Parquet or ``datasets.save_to_disk`` folders, as for training data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_sppo.data.prompts import (DEFAULT_INSTRUCTION, PromptRecord, answer_text,
                                        detect_format, read_rows, row_to_record,
                                        warn_truncated_ground_truths)
from megatron_sppo.errors import UserError

log = logging.getLogger(__name__)

PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer")
SOLUTION_FIELDS = ("solution",)


@dataclass(frozen=True)
class Benchmark:
    key: str    # data_source of its records and key in results
    title: str  # as the paper's tables write it
    size: int   # problems in the standard release


BENCHMARKS = {b.key: b for b in (
    Benchmark("aime24", "AIME24", 30),
    Benchmark("aime25", "AIME25", 30),
    Benchmark("amc23", "AMC23", 40),
    Benchmark("math500", "MATH500", 500),
    Benchmark("minerva_math", "Minerva-Math", 272),
)}
_ALIASES = {"aime2024": "aime24", "aime2025": "aime25", "amc2023": "amc23",
            "minerva": "minerva_math", "minervamath": "minerva_math"}


def benchmark_key(name: str) -> str:
    """``AIME24``, ``aime_2024``, ``Minerva-Math``, ``MATH-500`` ... -> the canonical key."""
    compact = re.sub(r"[^a-z0-9]", "", name.lower())
    key = _ALIASES.get(compact, compact)
    if key not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}: use one of "
                        f"{', '.join(b.title for b in BENCHMARKS.values())}")
    return key


def _get(row: dict, names: tuple[str, ...]):
    """The first present, non-empty field among ``names``, matched case-insensitively."""
    lower = {k.lower(): v for k, v in row.items()}
    for name in names:
        value = lower.get(name)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return None


def benchmark_record(row: dict, key: str, *, instruction: str, index: int,
                     where: str) -> PromptRecord:
    """One benchmark row as a record whose ``data_source`` is the benchmark key."""
    from megatron_sppo.rewards.math import last_boxed

    if "reward_model" in row and isinstance(row.get("prompt"), list):
        record = row_to_record(row, detect_format(row, where), instruction=instruction,
                               index=index, where=where)
        record.data_source = key
        return record
    problem = _get(row, PROBLEM_FIELDS)
    answer = _get(row, ANSWER_FIELDS)
    if answer is None and isinstance(_get(row, SOLUTION_FIELDS), str):
        answer = last_boxed(_get(row, SOLUTION_FIELDS))
    if problem is None or answer is None or isinstance(answer, (list, dict)):
        raise UserError(f"{where}: fields {sorted(row)} hold no problem "
                        f"({'/'.join(PROBLEM_FIELDS)}) or no single answer "
                        f"({'/'.join(ANSWER_FIELDS)}, or a solution with a \\boxed{{}} "
                        "answer): convert the file to {problem, answer}")
    text = str(problem).strip()
    metadata = {k: row[k] for k in ("id", "unique_id", "subject", "level", "year")
                if row.get(k) is not None}
    return PromptRecord(f"{text} {instruction}" if instruction else text, answer_text(answer),
                        key, metadata, index)


def load_benchmark(name: str, path: str | Path,
                   instruction: str = DEFAULT_INSTRUCTION) -> list[PromptRecord]:
    """The problems of benchmark ``name`` from ``path``. A size other than the standard
    release's is logged (a subset is allowed), not refused."""
    key = benchmark_key(name)
    rows = read_rows(path)
    if not rows:
        raise UserError(f"benchmark file {path} holds no problems: check the file")
    records = [benchmark_record(row, key, instruction=instruction, index=i,
                                where=f"{path}: record {i}") for i, row in enumerate(rows)]
    expected = BENCHMARKS[key].size
    if len(records) != expected:
        distinct = len({repr(r.prompt) for r in records})
        log.warning("%s: %d problems in %s (%d distinct), the standard release has %d",
                    BENCHMARKS[key].title, len(records), path, distinct, expected)
    warn_truncated_ground_truths(records, f"{BENCHMARKS[key].title} ({path})")
    return records


def load_benchmarks(paths: dict[str, str | Path],
                    instruction: str = DEFAULT_INSTRUCTION) -> dict[str, list[PromptRecord]]:
    """``{benchmark name: file}`` -> ``{key: records}`` in the given order."""
    out: dict[str, list[PromptRecord]] = {}
    for name, path in paths.items():
        key = benchmark_key(name)
        if key in out:
            raise UserError(f"benchmark {BENCHMARKS[key].title} is given twice: keep one file")
        out[key] = load_benchmark(key, path, instruction)
    return out
