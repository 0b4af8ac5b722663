"""The SPPO authors' own data files, as a user reproducing the paper points the recipes at
them: loaded by the trainer's and the evaluator's loaders as they are, scored the way the
authors' reward scores them, evaluated by ``megatron-sppo eval``; and the authors' treatment
of truncated responses and over-long prompts in the step batch.

The files are not copied here: each fixture below is written by this module in exactly the
schema of one of their files (github.com/1BIMU/SPPO at e1b4f27, ``data/``), with problems of
our own. What was checked against the real files (read with pyarrow, not committed):

- ``dapo-math-17k_dedup.parquet`` (17,398 rows): columns data_source, prompt (list of
  {content, role}, one user turn), ability ("MATH"), reward_model {ground_truth, style
  "rule-lighteval/MATH_v2"}, extra_info {index: a string UUID}; every data_source is
  ``math_dapo``; every prompt ends with "Please output the final answer within \\boxed{}."
  (their rewrite of DAPO's "Answer:" wrapper), 374 of them after " \\n", 20 also carry an
  "Answer: \\boxed{<final_answer>}" phrase of the original problem text; every ground truth
  is an integer string. ``load_prompt_records(format="dapo", instruction=DAPO_INSTRUCTION)``
  gives all 17,398 prompts back to the character.
- ``offline_eval/math__aime_repeated_8x_240.parquet``: 30 AIME 2024 problems 8 times each;
  columns solution, year, aime_number, problem_number, data_source
  ``math__aime_repeated_8x``, prompt, ability, apply_chat_template, reward_model {style
  "rule"}, extra_info {index, original_question, reward_metric "default", split "test"}.
- ``offline_eval/math__aime2025_2025.parquet`` (30), ``math__amc23_2025.parquet`` (40, plus
  pandas' ``__index_level_0__``) and ``math__minerva_math_2025_processed.parquet`` (272):
  ``abality`` (sic), extra_info {index, solution}; data_source ``aime2025``,
  ``math_deepscaler`` (AMC23 and Minerva alike); AMC23 answers are float strings ("27.0").
- ``offline_eval/math__math_500.parquet`` (500): unique_id first, data_source ``math__math``,
  LaTeX ground truths (``\\left( 3, \\frac{\\pi}{2} \\right)``).
- Minerva: 68 of the 272 ground truths end inside a brace group (``\\frac{dM``, ``\\sqrt{2``)
  where the solution's box goes on; the other 204, like every ground truth of the other four
  files (1,014 in all), score correct as ``\\boxed{gt}`` with this project's math reward.
- The authors' reward for all of these is verl's ``naive_dapo`` (their
  ``default_compute_score`` sends every data_source starting with "math" there, and
  ``aime2025`` to ``math_dapo``'s boxed check): the last ``\\boxed{}`` after ``</think>``.
- ``deepscaler-math.parquet`` (the 1.5B run's training file) is 4 MiB or more: absent from
  the fetched snapshot and unreadable in the code index, so it has no fixture here.
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run

from megatron_sppo.config import Config
from megatron_sppo.data.prompts import (DAPO_HEAD, DAPO_INSTRUCTION, DAPO_TAIL, PromptRecord,
                                        filter_by_length, load_prompt_records)
from megatron_sppo.errors import UserError
from megatron_sppo.evaluation import load_benchmark
from megatron_sppo.models.tiny import build_char_tokenizer
from megatron_sppo.rewards import RewardConfig, RewardScorer
from megatron_sppo.rewards.math import unclosed_brace
from megatron_sppo.rollout.engine import Sample

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
REWARD_MODEL = pa.struct([("ground_truth", pa.string()), ("style", pa.string())])
INFO_SOLUTION = pa.struct([("index", pa.int64()), ("solution", pa.string())])
INFO_SPLIT = pa.struct([("index", pa.int64()), ("original_question", pa.string()),
                        ("reward_metric", pa.string()), ("split", pa.string())])
SCHEMAS = {
    "dapo-math-17k_dedup": [("data_source", pa.string()), ("prompt", MESSAGES),
                            ("ability", pa.string()), ("reward_model", REWARD_MODEL),
                            ("extra_info", pa.struct([("index", pa.string())]))],
    "math__aime_repeated_8x_240": [
        ("solution", pa.string()), ("year", pa.int64()), ("aime_number", pa.int64()),
        ("problem_number", pa.int64()), ("data_source", pa.string()), ("prompt", MESSAGES),
        ("ability", pa.string()), ("apply_chat_template", pa.bool_()),
        ("reward_model", REWARD_MODEL), ("extra_info", INFO_SPLIT)],
    "math__aime2025_2025": [("data_source", pa.string()), ("prompt", MESSAGES),
                            ("abality", pa.string()), ("reward_model", REWARD_MODEL),
                            ("extra_info", INFO_SOLUTION)],
    "math__amc23_2025": [("data_source", pa.string()), ("prompt", MESSAGES),
                         ("abality", pa.string()), ("reward_model", REWARD_MODEL),
                         ("extra_info", INFO_SOLUTION), ("__index_level_0__", pa.int64())],
    "math__math_500": [("unique_id", pa.string()), ("data_source", pa.string()),
                       ("prompt", MESSAGES), ("ability", pa.string()),
                       ("apply_chat_template", pa.bool_()), ("reward_model", REWARD_MODEL),
                       ("extra_info", INFO_SPLIT)],
    "math__minerva_math_2025_processed": [
        ("data_source", pa.string()), ("prompt", MESSAGES), ("abality", pa.string()),
        ("reward_model", REWARD_MODEL), ("extra_info", INFO_SOLUTION)],
}
# file -> (benchmark of `megatron-sppo eval`, data_source, [(problem, ground truth, a wrong
# answer)]); problems are ours, spelled as theirs (float strings, LaTeX, cut Minerva truths).
PROBLEMS = {
    "dapo-math-17k_dedup": (None, "math_dapo", [
        ("Let $n$ be the least positive integer with $n^2 > 50$. Find $n$.", "8", "7"),
        ("How many primes are below $30$?\nWrite it as “Answer: \\boxed{<final_answer>}”.",
         "10", "9"),
        ("What is $3^4$? \n", "81", "27")]),
    "math__aime_repeated_8x_240": ("aime24", "math__aime_repeated_8x", [
        ("Find the remainder when $2^{10}$ is divided by $1000$.", "24", "42"),
        ("Find the number of subsets of $\\{1,2,\\dots,9\\}$ with $2$ elements.", "36", "72")]),
    "math__aime2025_2025": ("aime25", "aime2025", [
        ("Find the sum of the digits of $2025$.", "9", "8"),
        ("Find $x$ if $\\log_2 x = 7$.", "128", "64")]),
    "math__amc23_2025": ("amc23", "math_deepscaler", [
        ("A train goes $60$ miles in $5$ hours. How many miles per hour is that?", "12.0", "5"),
        ("What is $\\frac{3}{4}$ of $2$?", "1.5", "0.75")]),
    "math__math_500": ("math500", "math__math", [
        ("Convert $(0,2)$ to polar coordinates $(r,\\theta)$.",
         "\\left( 2, \\frac{\\pi}{2} \\right)", "\\left( 2, \\pi \\right)"),
        ("Simplify $\\frac{6}{14}$.", "\\frac{3}{7}", "\\frac{7}{3}"),
        ("Which choice is prime: (A) 4, (B) 5, (C) 6?", "\\text{(B)}", "\\text{(C)}"),
        ("Solve $-2 \\le x < 5$ as an interval.", "[-2, 5)", "(-2, 5]")]),
    "math__minerva_math_2025_processed": ("minerva_math", "math_deepscaler", [
        ("Give the power in watts, to two significant figures.", "3.2e12", "3.2e11"),
        ("Give the thermal speed squared in terms of $k$, $T$ and $m$.", "\\frac{k T}{m}",
         "\\frac{m}{k T}"),
        ("Give the orbital speed squared.", "\\frac{G M", "\\frac{M}{G}"),  # cut, as theirs
        ("Solve $\\ddot{x} + x = 0$ with $x(0)=\\sqrt{5}$.", "\\sqrt{5", "\\sqrt{3}")]),
}
CUT = {"\\frac{G M": "\\frac{G M}{r}", "\\sqrt{5": "\\sqrt{5} \\cos t"}  # their solutions' boxes


def _content(problem: str) -> str:
    sep = "" if problem.endswith("\n") else " "
    return f"{problem}{sep}{DAPO_INSTRUCTION}"


def _row(name: str, i: int, problem: str, truth: str) -> dict:
    """One row of ``name`` in its schema's column order."""
    _, source, _ = PROBLEMS[name]
    prompt = [{"content": _content(problem), "role": "user"}]
    reward = {"ground_truth": truth, "style": "rule"}
    box = CUT.get(truth, truth)
    if name == "dapo-math-17k_dedup":
        return {"data_source": source, "prompt": prompt, "ability": "MATH",
                "reward_model": {"ground_truth": truth, "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"00000000-0000-4000-8000-{i:012d}"}}
    split_info = {"index": i, "original_question": problem, "reward_metric": "default",
                  "split": "test"}
    if name == "math__aime_repeated_8x_240":
        return {"solution": f"So it is $\\boxed{{{box}}}$.", "year": 2024, "aime_number": 1,
                "problem_number": i % 2 + 1, "data_source": source, "prompt": prompt,
                "ability": "math", "apply_chat_template": True, "reward_model": reward,
                "extra_info": split_info}
    if name == "math__math_500":
        return {"unique_id": f"test/algebra/{i}.json", "data_source": source,
                "prompt": prompt, "ability": "math", "apply_chat_template": True,
                "reward_model": reward, "extra_info": split_info}
    row = {"data_source": source, "prompt": prompt, "abality": "math", "reward_model": reward,
           "extra_info": {"index": i, "solution": f"Hence $\\boxed{{{box}}}$."}}
    return {**row, "__index_level_0__": i} if name == "math__amc23_2025" else row


def rows_of(name: str) -> list[dict]:
    problems = PROBLEMS[name][2]
    copies = 8 if name == "math__aime_repeated_8x_240" else 1
    order = [p for p in problems for _ in range(copies)]  # their 8 copies sit together
    return [_row(name, i, problem, truth) for i, (problem, truth, _) in enumerate(order)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("authors")
    out = {}
    for name, columns in SCHEMAS.items():
        out[name] = root / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows_of(name), schema=pa.schema(columns)),
                       out[name])
    return out


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(workers=2)) as s:
        yield s


def test_the_files_load_as_they_are(files, caplog):
    for name, path in files.items():
        benchmark, source, problems = PROBLEMS[name]
        rows = rows_of(name)
        records = load_prompt_records([path])  # format auto: verl
        assert [r.prompt for r in records] == [row["prompt"] for row in rows], name
        assert [r.ground_truth for r in records] == \
            [row["reward_model"]["ground_truth"] for row in rows], name
        assert {r.data_source for r in records} == {source}, name
        if benchmark:
            loaded = load_benchmark(benchmark, path)
            assert [r.prompt for r in loaded] == [r.prompt for r in records]
            assert {r.data_source for r in loaded} == {benchmark}
    assert "Minerva-Math" in caplog.text
    assert "2 of 4 ground truths are cut at a brace" in caplog.text
    assert "16 problems" in caplog.text and "(2 distinct)" in caplog.text  # AIME24 x 8
    assert [unclosed_brace(t) for _, t, _ in PROBLEMS["math__minerva_math_2025_processed"][2]] \
        == [False, False, True, True]


def test_dapo_format_takes_their_file_and_the_published_one(files):
    """``--format dapo`` reads the authors' file back to the character (with their
    instruction), and turns DAPO-Math-17k as published into what their
    transformer_dapo_prmopt.py makes of it: blank lines become spaces, the two "Answer:"
    sentences give way to their instruction."""
    path = files["dapo-math-17k_dedup"]
    theirs = load_prompt_records([path], format="dapo", instruction=DAPO_INSTRUCTION)
    assert [r.prompt for r in theirs] == [row["prompt"][0]["content"]
                                          for row in rows_of("dapo-math-17k_dedup")]
    bare = load_prompt_records([path], format="dapo", instruction="")
    assert bare[2].prompt == "What is $3^4$?"
    text = f"{DAPO_HEAD}\n\nLet $a$ be\n\nthe answer. Find $a$.\n\n{DAPO_TAIL}"
    published = [{"content": text, "role": "user"}]
    source = path.with_name("published.parquet")
    pq.write_table(pa.Table.from_pylist([{**rows_of("dapo-math-17k_dedup")[0],
                                          "prompt": published}]), source)
    (record,) = load_prompt_records([source], format="dapo", instruction=DAPO_INSTRUCTION)
    assert record.prompt == f"Let $a$ be the answer. Find $a$. {DAPO_INSTRUCTION}"
    assert record.data_source == "math"


def _sample(text: str) -> Sample:
    return Sample(token_ids=[], logprobs=[], finish_reason="stop", text=text)


def test_gold_and_wrong_boxed_answers_score_as_the_authors_reward(files, scorer):
    """Their reward reads the last box after ``</think>``: a gold box there is right, a
    wrong one wrong, whatever was boxed while thinking; a response cut before ``</think>``
    is read whole. A cut ground truth matches nothing, its own box included."""
    for name, path in files.items():
        benchmark, _, problems = PROBLEMS[name]
        records = load_prompt_records([path])
        if benchmark:
            records += load_benchmark(benchmark, path)
        truths = {t: w for _, t, w in problems}
        samples = [[_sample(f"<think>\nmaybe $\\boxed{{{truths[r.ground_truth]}}}$\n</think>\n"
                            f"The answer is $\\boxed{{{r.ground_truth}}}$."),
                    _sample(f"<think>\nmaybe $\\boxed{{{r.ground_truth}}}$\n</think>\n"
                            f"The answer is $\\boxed{{{truths[r.ground_truth]}}}$."),
                    _sample(f"Thinking... so $\\boxed{{{r.ground_truth}}}$, then")]
                   for r in records]
        status = scorer.score(records, samples).status
        for i, r in enumerate(records):
            got = status[3 * i:3 * i + 3]
            if unclosed_brace(r.ground_truth):
                assert got[0] == got[2] == "no_answer" and got[1] == "incorrect", (name, got)
            else:
                assert got == ["correct", "incorrect", "correct"], (name, r.ground_truth, got)


def test_dapo_rows_are_checked_as_their_prompt_asks(scorer):
    """``math_dapo`` names both forms: a box for the authors' prompts, DAPO's own "Answer:"
    line for the published ones (a box when there is no such line)."""
    boxed = PromptRecord([{"role": "user", "content": _content("Find $x$.")}], "8",
                         "math_dapo")
    published = f"{DAPO_HEAD}\n\nFind $x$.\n\n{DAPO_TAIL}"
    line = PromptRecord([{"role": "user", "content": published}], "8", "math_dapo")
    texts = ["</think> $\\boxed{8}$", "</think>\nAnswer: 8", "</think>\nAnswer: 7\n\\boxed{8}"]
    out = scorer.score([boxed, line], [[_sample(t) for t in texts]] * 2)
    assert out.status == ["correct", "no_answer", "correct",
                          "correct", "correct", "incorrect"]


def test_eval_command_on_the_five_evaluation_files(files, tmp_path):
    """`megatron-sppo eval` on the five evaluation-file formats with a tiny random model:
    every file loads as it is, each benchmark is reported, the cut Minerva truths are
    counted in eval.json, noted in eval.md and warned about."""
    from megatron_sppo.models.tiny import make_tiny_hf_model

    model = make_tiny_hf_model(tmp_path / "model", family="qwen2")
    pairs = [(b, files[n]) for n, (b, _, _) in PROBLEMS.items() if b]
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "megatron_sppo", "eval", "--model", model,
                *[a for b, f in pairs for a in ("--benchmark", f"{b}={f}")],
                "--output-dir", out, "--k", "2", "--max-new-tokens", "4", "--no-tensorboard"])
    got = json.loads((out / "eval.json").read_text())
    assert {b: m["problems"] for b, m in got["benchmarks"].items()} == \
        {"aime24": 16, "aime25": 2, "amc23": 2, "math500": 4, "minerva_math": 4}
    assert {b: m["truncated_ground_truths"] for b, m in got["benchmarks"].items()} == \
        {"aime24": 0, "aime25": 0, "amc23": 0, "math500": 0, "minerva_math": 2}
    assert all(m["samples_per_problem"] == 2 for m in got["benchmarks"].values())
    assert "Minerva-Math: 2 of 4 ground truths are cut at a brace" in \
        (out / "eval.md").read_text()
    assert "2 of 4 ground truths are cut at a brace" in proc.stderr


# ---- the step batch: truncated responses and over-long prompts ---------------------------

def _components(cfg: Config):
    from megatron_sppo.trainer.components import Components

    return Components(cfg=cfg, policy=None, critic=None, reference=None,
                      tokenizer=build_char_tokenizer(), critic_tokenizer=None, prompts=None)


def test_truncated_responses_as_the_authors_or_penalised_consistently():
    """The authors grade a truncated response as any other (``truncated_reward: null``);
    with a penalty the critic's target follows the reward, so V keeps estimating the
    chance of the reward that A = R - V subtracts it from."""
    from megatron_sppo.rewards import Scored
    from megatron_sppo.trainer.components import make_step_batch

    records = [PromptRecord("1+1?", "2"), PromptRecord("2+2?", "4")]
    rollouts = {"samples": [[Sample([5, 6], [-0.1, -0.2], "length", "\\boxed{2}")],
                            [Sample([7], [-0.3], "stop", "\\boxed{4}")]]}
    scored = Scored([1.0, 1.0], [1.0, 1.0], ["correct", "correct"])
    for truncated_reward, rewards, correctness in ((None, [1.0, 1.0], [1.0, 1.0]),
                                                   (0.0, [0.0, 1.0], [0.0, 1.0]),
                                                   (-0.5, [-0.5, 1.0], [0.0, 1.0])):
        cfg = Config()
        cfg.algorithm.truncated_reward = truncated_reward
        batch = make_step_batch(_components(cfg), cfg, records, rollouts, scored)
        assert batch.rewards.tolist() == rewards and batch.correctness.tolist() == correctness
        assert batch.truncated.tolist() == [True, False]


def test_overlong_prompts_dropped_or_cut_from_the_left():
    cfg = Config()
    c = _components(cfg)
    records = [PromptRecord("x" * 5, "1", index=0), PromptRecord("y" * 90, "1", index=1)]
    full = c.prompt_ids(records)
    cfg.rollout.max_prompt_length = len(full[0]) + 3
    assert c.prompt_ids(records) == full  # drop (the default) filters at load, cuts nothing
    reports = []
    kept = filter_by_length(records, c.tokenizer, cfg.rollout.max_prompt_length, reports.append)
    assert [r.index for r in kept] == [0] and reports[0].startswith("dropped 1 of 2")
    cfg.data.overlong_prompts = "truncate_left"  # the authors' 7B run: data.truncation=left
    assert filter_by_length(records, c.tokenizer, cfg.rollout.max_prompt_length,
                            reports.append, overlong="truncate_left") == records
    assert reports[1].startswith("1 of 2 prompts are longer")
    short, cut = c.prompt_ids(records)
    assert short == full[0] and cut == full[1][-cfg.rollout.max_prompt_length:]
    assert c.tokenizer.decode(cut).endswith("<|im_start|>assistant\n")
    cfg.data.overlong_prompts = "right"
    with pytest.raises(UserError, match="data.overlong_prompts='right'"):
        cfg.data.check()
