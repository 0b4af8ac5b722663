"""Benchmark evaluation: pass@k against brute-force enumeration, the benchmark loaders on
their public layouts, and ``evaluate`` end to end with a scripted engine whose answers give
hand-computed avg@k / pass@k / length / truncation numbers."""

from __future__ import annotations

import itertools
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sppo.errors import UserError
from megatron_sppo.evaluation import (BENCHMARKS, PAPER_SAMPLING, benchmark_key, evaluate,
                                      flat_metrics, load_benchmark, load_benchmarks, pass_at_k,
                                      summarize, write_report)
from megatron_sppo.models.tiny import build_char_tokenizer
from megatron_sppo.rewards import RewardConfig, RewardScorer
from megatron_sppo.rollout.engine import Sample, SamplingParams


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k))
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)  # pass@1 is the success rate
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)  # no overflow at large n
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_summarize_by_hand():
    outcomes = [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    lengths = [[10, 20, 30, 40]] * 3
    truncated = [[False, False, False, True]] * 3
    m = summarize(outcomes, lengths, truncated)
    assert m["avg@4"] == pytest.approx(3 / 12)
    assert m["pass@1"] == pytest.approx(3 / 12)
    # pass@2: 1 - C(2,2)/C(4,2) = 5/6; 1 - C(3,2)/C(4,2) = 1/2; 0
    assert m["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["response_length_mean"] == 25.0 and m["truncation_rate"] == 0.25
    with pytest.raises(ValueError, match="same"):
        summarize([[1, 0], [1]], [[1, 1], [1]], [[0, 0], [0]])


# ---- loaders -------------------------------------------------------------------------------

def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_benchmark_loaders_read_the_public_layouts(tmp_path):
    files = {
        # HuggingFaceH4/aime_2024
        "AIME24": _parquet(tmp_path / "aime24.parquet", [
            {"id": 60, "problem": "Find m+n.", "solution": "... $\\boxed{204}$", "answer": "204",
             "url": "https://x", "year": "2024"}]),
        # math-ai/aime25
        "aime_2025": _jsonl(tmp_path / "aime25.jsonl", [{"problem": "Find k.", "answer": "70",
                                                         "id": "0"}]),
        # math-ai/amc23 (answers stored as floats)
        "AMC23": _parquet(tmp_path / "amc23.parquet", [
            {"id": 0, "question": "How many?", "answer": 27.0, "url": "https://x"}]),
        # HuggingFaceH4/MATH-500
        "MATH-500": _jsonl(tmp_path / "math500.jsonl", [
            {"problem": "Convert.", "solution": "... \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
             "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus",
             "level": 2, "unique_id": "test/precalculus/807.json"}]),
        # the original Minerva-Math release: the answer is boxed in the solution
        "Minerva-Math": _jsonl(tmp_path / "minerva.jsonl", [
            {"problem": "Compute the flux.", "solution": "So it is $\\boxed{4.5e33}$.",
             "type": "Introduction to Astronomy (8.282J Spring 2006)", "idx": 0}]),
    }
    loaded = load_benchmarks(files, instruction="Box it.")
    assert list(loaded) == ["aime24", "aime25", "amc23", "math500", "minerva_math"]
    truths = {k: [r.ground_truth for r in v] for k, v in loaded.items()}
    assert truths == {"aime24": ["204"], "aime25": ["70"], "amc23": ["27"],
                      "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)"],
                      "minerva_math": ["4.5e33"]}
    assert loaded["amc23"][0].prompt == "How many? Box it."
    assert loaded["math500"][0].metadata["unique_id"] == "test/precalculus/807.json"
    assert all(r.data_source == k for k, v in loaded.items() for r in v)


def test_benchmark_variants_names_and_errors(tmp_path, caplog):
    # Maxwell-Jia/AIME_2024 capitalises its fields; math-ai/minervamath has question/answer
    caps = load_benchmark("aime24", _jsonl(tmp_path / "a.jsonl", [
        {"ID": "2024-I-1", "Problem": "P?", "Solution": "s", "Answer": 204}]), instruction="")
    assert (caps[0].prompt, caps[0].ground_truth) == ("P?", "204")
    assert "30" in caplog.text  # the standard release size is mentioned for a subset
    minerva = load_benchmark("minerva", _jsonl(tmp_path / "m.jsonl", [
        {"question": "Q?", "answer": "0.5"}]))
    assert minerva[0].ground_truth == "0.5"
    verl = load_benchmark("MATH500", _parquet(tmp_path / "v.parquet", [
        {"data_source": "HuggingFaceH4/MATH-500", "prompt": [{"role": "user", "content": "Q"}],
         "reward_model": {"ground_truth": "3", "style": "rule"}}]))
    assert (verl[0].prompt, verl[0].data_source) == ([{"role": "user", "content": "Q"}],
                                                     "math500")
    assert [benchmark_key(n) for n in ("AIME 2024", "amc_2023", "MinervaMath")] == \
        ["aime24", "amc23", "minerva_math"]
    with pytest.raises(UserError, match="unknown benchmark 'gsm8k'.*AIME24"):
        benchmark_key("gsm8k")
    with pytest.raises(UserError, match=r"no problem .* or no single answer"):
        load_benchmark("aime25", _jsonl(tmp_path / "bad.jsonl", [{"problem": "P", "id": 1}]))
    with pytest.raises(UserError, match="given twice"):
        load_benchmarks({"aime24": tmp_path / "a.jsonl", "AIME-2024": tmp_path / "a.jsonl"})


# ---- evaluate ------------------------------------------------------------------------------

class ScriptedEngine:
    """Returns fixed responses per problem (found in the decoded prompt): a test double for
    the engine, so the metrics can be computed by hand. ``(text, finish_reason)`` each."""

    def __init__(self, tokenizer, script: dict[str, list[tuple[str, str]]]):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params))
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            (replies,) = [r for problem, r in self.script.items() if problem in text]
            out.append([Sample(token_ids=self.tokenizer.encode(t), logprobs=[0.0] * len(t),
                               finish_reason=reason, text=t) for t, reason in replies[:params.n]])
        return out


def test_evaluate_end_to_end_with_hand_computed_metrics(tmp_path):
    tok = build_char_tokenizer()
    problems = {"aime24": load_benchmark("aime24", _jsonl(tmp_path / "a.jsonl", [
                    {"problem": "Problem A", "answer": "5"},
                    {"problem": "Problem B", "answer": "\\frac{1}{2}"}])),
                "math500": load_benchmark("math500", _jsonl(tmp_path / "m.jsonl", [
                    {"problem": "Problem C", "answer": "7"}]))}
    stop, cut = "stop", "length"
    engine = ScriptedEngine(tok, {
        "Problem A": [(r"\boxed{5}", stop), (r"</think>\boxed{5}", stop), (r"\boxed{4}", stop),
                      ("I give up", stop)],
        "Problem B": [(r"\boxed{0.5}", stop), (r"\boxed{1}", stop), (r"\boxed{2}", stop),
                      (r"\boxed{3}", stop)],
        "Problem C": [(r"\boxed{7}", stop), (r"\boxed{7.0}", stop), (r"\boxed{ 7 }", stop),
                      (r"so \boxed{7", cut)],
    })
    # reward.shuffle (the control run) must not leak into evaluation
    with RewardScorer(RewardConfig(workers=1, shuffle=True)) as scorer:
        results = evaluate(engine, problems, tok, k=4, sampling=PAPER_SAMPLING, scorer=scorer)

    ((n_prompts, params),) = engine.calls  # one call for every benchmark
    assert n_prompts == 3 and params.n == 4
    assert (params.temperature, params.top_p) == (0.6, 0.95)

    aime, math500 = results["benchmarks"]["aime24"], results["benchmarks"]["math500"]
    assert aime["avg@4"] == pytest.approx(3 / 8)
    assert aime["pass@1"] == pytest.approx(3 / 8)
    assert aime["pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert aime["pass@4"] == 1.0
    assert aime["correct_per_problem"] == [2, 1]
    assert aime["no_answer_rate"] == pytest.approx(1 / 8)
    lengths = [9, 1 + 9, 9, 9, 11, 9, 9, 9]  # one token a character; </think> is one token
    assert aime["response_length_mean"] == pytest.approx(sum(lengths) / 8)
    assert aime["truncation_rate"] == 0.0
    # the truncated response has an unclosed box: no answer, so 3 of 4 are right
    assert math500["avg@4"] == 0.75 and math500["truncation_rate"] == 0.25
    assert results["average"]["avg@4"] == pytest.approx((3 / 8 + 3 / 4) / 2)

    metrics = flat_metrics(results)
    assert metrics["eval/aime24/avg@4"] == pytest.approx(0.375)
    assert metrics["eval/average/avg@4"] == pytest.approx(0.5625)

    json_path, md_path = write_report(results, tmp_path / "report")
    assert json.loads(json_path.read_text()) == results
    table = md_path.read_text()
    assert "| AIME24 | 2 | 37.50 | 37.50 | 66.67 | 100.00 |" in table
    assert "| MATH500 | 1 | 75.00 |" in table and "| **Average** | | 56.25 |" in table
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["eval.json", "eval.md"]


def test_paper_setting():
    assert (PAPER_SAMPLING.n, PAPER_SAMPLING.temperature, PAPER_SAMPLING.top_p) == (16, 0.6, 0.95)
    assert isinstance(PAPER_SAMPLING, SamplingParams)
    assert {b.title for b in BENCHMARKS.values()} == {"AIME24", "AIME25", "AMC23", "MATH500",
                                                      "Minerva-Math"}
    assert math.isclose(sum(b.size for b in BENCHMARKS.values()), 30 + 30 + 40 + 500 + 272)


def test_eval_command_matches_the_library_call(zoo, tmp_path):
    """`megatron-sppo eval` on a tiny HF model: the same numbers as ``evaluate`` called
    directly with the local engine and the same sampling, plus the TensorBoard scalars."""
    import sys

    from helpers import run
    from transformers import AutoTokenizer

    from megatron_sppo.rollout.local import LocalEngine

    model = zoo["qwen2_gqa_untied"]
    files = {"aime24": _jsonl(tmp_path / "a.jsonl", [{"problem": "1+1", "answer": "2"},
                                                     {"problem": "2+3", "answer": "5"}]),
             "math500": _jsonl(tmp_path / "m.jsonl", [{"problem": "9-4", "answer": "5"}])}
    out = tmp_path / "out"
    run([sys.executable, "-m", "megatron_sppo", "eval", "--model", model,
         "--benchmark", f"aime24={files['aime24']}", "--benchmark", f"math500={files['math500']}",
         "--output-dir", out, "--k", "3", "--temperature", "1.0", "--top-p", "0.9",
         "--max-new-tokens", "6", "--seed", "5", "--reward", "math"])
    got = json.loads((out / "eval.json").read_text())

    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, n=3, seed=5)
    engine = LocalEngine(model, load_weights=True)
    with RewardScorer(RewardConfig(workers=1)) as scorer:
        want = evaluate(engine, load_benchmarks(files), AutoTokenizer.from_pretrained(model),
                        k=3, sampling=sampling, scorer=scorer)
    assert got == json.loads(json.dumps(want))
    assert got["benchmarks"]["aime24"]["problems"] == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "eval.md").read_text().startswith("|")
