"""Benchmark evaluation with any rollout engine: k samples per problem, checked by the reward
scorer's 0/1 correctness (never the shaped reward), summarised per benchmark, written as JSON
and a markdown table.

The paper's setting is :data:`PAPER_SAMPLING` (k = 16, temperature 0.6, top_p 0.95); its
"Avg" column is the unweighted mean of the benchmarks' avg@k, reported here as ``average``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_sppo.data.prompts import PromptRecord, chat_prompt_ids
from megatron_sppo.evaluation.benchmarks import BENCHMARKS
from megatron_sppo.evaluation.metrics import summarize
from megatron_sppo.fileio import write_text_atomic
from megatron_sppo.rollout.engine import EngineError, SamplingParams

PAPER_K = 16
PAPER_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=8192, n=PAPER_K,
                                seed=0)


def evaluate(engine, problems: dict[str, list[PromptRecord]] | list[PromptRecord], tokenizer,
             *, k: int = PAPER_K, sampling: SamplingParams = PAPER_SAMPLING, scorer=None,
             pass_ks: list[int] | None = None) -> dict:
    """Sample ``k`` responses per problem (one ``engine.generate`` call for all benchmarks,
    so the engine batches them together) and check them.

    ``problems``: ``{benchmark: records}`` (a bare list is one benchmark called ``eval``).
    ``scorer``: a :class:`~megatron_sppo.rewards.RewardScorer` to reuse (the trainer's);
    by default a ``math`` scorer is made and closed here. Returns ``{"k", "sampling",
    "benchmarks": {name: metrics}, "average": {...}}``; each benchmark's metrics are
    :func:`~megatron_sppo.evaluation.metrics.summarize`'s plus ``no_answer_rate``,
    ``reward_timeouts``, ``truncated_ground_truths`` (problems whose ground truth is cut at a
    brace: no answer can match them) and ``correct_per_problem``.
    """
    from megatron_sppo.rewards import RewardScorer
    from megatron_sppo.rewards.math import unclosed_brace

    if isinstance(problems, list):
        problems = {"eval": problems}
    if not problems or not all(problems.values()):
        raise ValueError("evaluate needs at least one problem per benchmark")
    records = [r for recs in problems.values() for r in recs]
    params = dataclasses.replace(sampling, n=k)
    samples = engine.generate([chat_prompt_ids(tokenizer, r.prompt) for r in records], params)
    if len(samples) != len(records) or any(len(s) != k for s in samples):
        raise EngineError(f"the engine returned {[len(s) for s in samples][:8]}... samples for "
                          f"{len(records)} prompts; expected {k} each")
    own = scorer is None
    scorer = RewardScorer() if own else scorer
    try:
        scored = scorer.score(records, samples)
    finally:
        if own:
            scorer.close()

    benchmarks, start = {}, 0
    for name, recs in problems.items():
        rows = slice(start * k, (start + len(recs)) * k)
        ours = samples[start:start + len(recs)]
        status = scored.status[rows]  # unlike correctness, never permuted by reward.shuffle
        correct = [1.0 if s == "correct" else 0.0 for s in status]
        outcomes = [correct[i * k:(i + 1) * k] for i in range(len(recs))]
        metrics = summarize(outcomes, [[len(s.token_ids) for s in per] for per in ours],
                            [[s.truncated for s in per] for per in ours], pass_ks)
        metrics["no_answer_rate"] = status.count("no_answer") / len(status)
        metrics["reward_timeouts"] = status.count("timeout")
        metrics["truncated_ground_truths"] = sum(unclosed_brace(r.ground_truth) for r in recs)
        metrics["correct_per_problem"] = [int(sum(o)) for o in outcomes]
        benchmarks[name] = metrics
        start += len(recs)
    avg_key = f"avg@{k}"
    average = {avg_key: sum(m[avg_key] for m in benchmarks.values()) / len(benchmarks)}
    sampling_used = {key: list(v) if isinstance(v, tuple) else v
                     for key, v in dataclasses.asdict(params).items()}  # as JSON reads back
    return {"k": k, "sampling": sampling_used, "benchmarks": benchmarks, "average": average}


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Scalars for TensorBoard: ``{prefix}/{benchmark}/{metric}`` and
    ``{prefix}/average/avg@k``."""
    out = {}
    for name, metrics in results["benchmarks"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                out[f"{prefix}/{name}/{key}"] = float(value)
    out.update({f"{prefix}/average/{key}": float(v) for key, v in results["average"].items()})
    return out


def _title(name: str) -> str:
    return BENCHMARKS[name].title if name in BENCHMARKS else name


def markdown_table(results: dict) -> str:
    """One row per benchmark (percentages) and the average row, as in the paper's table."""
    k = results["k"]
    first = next(iter(results["benchmarks"].values()))
    pass_cols = [key for key in first if key.startswith("pass@")]
    cols = [f"avg@{k}", *pass_cols]
    lines = ["| benchmark | problems | " + " | ".join(cols)
             + " | mean length | truncated | no answer |",
             "|---|---:|" + "---:|" * (len(cols) + 3)]
    for name, m in results["benchmarks"].items():
        cells = [f"{100 * m[c]:.2f}" for c in cols]
        lines.append(f"| {_title(name)} | {m['problems']} | " + " | ".join(cells)
                     + f" | {m['response_length_mean']:.1f} | {100 * m['truncation_rate']:.2f}"
                     + f" | {100 * m['no_answer_rate']:.2f} |")
    lines.append(f"| **Average** | | {100 * results['average'][f'avg@{k}']:.2f} |"
                 + " |" * (len(cols) + 2))
    t = results["sampling"]
    for name, m in results["benchmarks"].items():
        cut, problems = m.get("truncated_ground_truths", 0), m["problems"]
        if cut:
            lines += ["", f"{_title(name)}: {cut} of {problems} ground truths are cut at a "
                      "brace, so no answer matches them: its score cannot exceed "
                      f"{100 * (1 - cut / problems):.2f}."]
    lines.append("")
    lines.append(f"k = {k} samples per problem, temperature {t['temperature']}, "
                 f"top_p {t['top_p']}, max {t['max_new_tokens']} new tokens; rates in %, "
                 "lengths in tokens.")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path, name: str = "eval") -> tuple[Path, Path]:
    """``{out_dir}/{name}.json`` (everything) and ``{out_dir}/{name}.md`` (the table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    write_text_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(md_path, markdown_table(results))
    return json_path, md_path
