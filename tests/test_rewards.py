"""The math reward (extraction and equivalence, hand-checked cases), the time-limited worker
pool (timeouts, crashes, load) and the reward registry (config values, user functions,
routing by data_source, errors with the sample index)."""

from __future__ import annotations

import operator
import os
import textwrap
import time

import pytest

from megatron_sppo.data.prompts import PromptRecord
from megatron_sppo.errors import UserError
from megatron_sppo.rewards import (RewardConfig, RewardFunctionError, RewardScorer, WorkerPool,
                                   extract_answer, math_reward)
from megatron_sppo.rewards.math import check_answer, parse_ground_truth
from megatron_sppo.rewards.pool import TaskError
from megatron_sppo.rollout.engine import Sample

# (response, ground truth, expected reward): each checked by hand.
CASES = [
    # fractions, decimals, \dfrac / \tfrac / a/b
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\tfrac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.75}", r"\frac{3}{4}", 1.0),
    (r"\boxed{5/2}", "2.5", 1.0),
    (r"\boxed{1\frac{1}{2}}", r"\frac32", 1.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    (r"\boxed{\frac{2}{3}}", r"\frac{1}{3}", 0.0),
    # negatives and signs
    (r"\boxed{-3.0}", "-3", 1.0),
    (r"\boxed{-0.5}", r"-\frac{1}{2}", 1.0),
    (r"\boxed{-\frac12}", r"\frac{-1}{2}", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    # thousands separators
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{1{,}000}", "1000", 1.0),
    (r"\boxed{1\,000}", "1000", 1.0),
    (r"\boxed{1,000,000}", "1000000", 1.0),
    # percentages
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{50%}", "50", 1.0),
    (r"\boxed{25\%}", r"\frac{1}{4}", 1.0),
    (r"\boxed{40\%}", "50", 0.0),
    # degrees and units
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{30^{\circ}}", "30", 1.0),
    (r"\boxed{30°}", "30", 1.0),
    (r"\boxed{30\degree}", "30", 1.0),
    (r"\boxed{45^\circ}", "30", 0.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{12 \text{ inches}}", "12", 1.0),
    (r"\boxed{\$18.90}", "18.9", 1.0),
    # \text answers
    (r"\boxed{\text{Monday}}", r"\text{Monday}", 1.0),
    (r"\boxed{\textbf{(C)}}", r"\text{(C)}", 1.0),
    (r"\boxed{\text{(B)}}", r"\text{(C)}", 0.0),
    # intervals, sets, tuples, matrices
    (r"\boxed{(1,2]}", "(1,2]", 1.0),
    (r"\boxed{[1,2]}", "(1,2]", 0.0),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1.0),
    (r"\boxed{x \in [2, 5)}", "[2,5)", 1.0),
    (r"\boxed{\{3,2,1\}}", r"\{1,2,3\}", 1.0),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    (r"\boxed{\varnothing}", r"\emptyset", 1.0),
    (r"\boxed{(3, -1)}", "(3,-1)", 1.0),
    (r"\boxed{(-1, 3)}", "(3,-1)", 0.0),
    (r"\boxed{\begin{bmatrix}1&2\\3&4\end{bmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix}1&2\\3&5\end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 0.0),
    # expressions and radicals
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (r"\boxed{\frac{1}{2}\pi}", r"\frac{\pi}{2}", 1.0),
    (r"\boxed{2^{1/3}}", r"\sqrt[3]{2}", 1.0),
    (r"\boxed{x=5}", "5", 1.0),
    # wrong answers
    (r"\boxed{4}", "3", 0.0),
    (r"\boxed{2.0001}", "2", 0.0),
    (r"\boxed{b}", "a", 0.0),
    (r"\boxed{3.14159}", r"\pi", 0.0),
    # box forms: nested, bare, \fbox, escaped braces, last box wins
    (r"\fbox{7}", "7", 1.0),
    (r"the answer is $\boxed 5$.", "5", 1.0),
    (r"\boxed{\frac{\frac{1}{2}}{2}}", "0.25", 1.0),
    (r"\boxed{\left\{ 1 \right.}", "1", 1.0),
    (r"first \boxed{3}, finally \boxed{4}", "4", 1.0),
    (r"first \boxed{3}, finally \boxed{4}", "3", 0.0),
    # no answer: empty box, unbalanced braces, no box at all
    (r"\boxed{}", "0", 0.0),
    (r"\boxed{5", "5", 0.0),
    (r"\boxed{5} then \boxed{6", "5", 0.0),
    ("the answer is 5", "5", 0.0),
    # think blocks: only the text after the last </think> counts
    (r"<think>so \boxed{5}</think> The answer is five.", "5", 0.0),
    (r"reasoning \boxed{4} </think> \boxed{5}", "5", 1.0),
    (r"a </think> b \boxed{4} </think> \boxed{5}", "5", 1.0),
    (r"<think>maybe \boxed{4}</think>\boxed{5}", "4", 0.0),
]


@pytest.mark.parametrize("response,truth,expected", CASES)
def test_math_reward_cases(response, truth, expected):
    assert math_reward(response, truth) == expected


def test_case_list_is_broad():
    assert len(CASES) >= 60
    assert {e for *_, e in CASES} == {0.0, 1.0}


def test_extraction_details():
    assert extract_answer(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert extract_answer(r"x \boxed{ 12 } y") == "12"
    assert extract_answer(r"\boxed{\text{a}} and \fbox{b}") == "b"
    assert extract_answer("no box here") is None
    # R1 templates open <think> in the prompt: with require_think_close an unclosed think
    # block is no answer, without it the whole response is read.
    assert extract_answer(r"thinking \boxed{5}", require_think_close=True) is None
    assert extract_answer(r"thinking \boxed{5}") == "5"
    assert extract_answer(r"t </think> \boxed{5}", require_think_close=True) == "5"
    assert math_reward(r"thinking \boxed{5}", "5", require_think_close=True) == 0.0


def test_answer_mode():
    assert extract_answer("work\nAnswer: 42", mode="answer") == "42"
    assert extract_answer("**Answer:** $\\frac{1}{2}$.", mode="answer") == r"\frac{1}{2}"
    assert extract_answer("Answer: 3\nno wait\nAnswer: \\boxed{4}", mode="answer") == "4"
    assert extract_answer(r"\boxed{5}", mode="answer") == "5"  # no Answer line: the last box
    assert extract_answer("Answer: 42") is None  # boxed mode ignores the Answer line
    assert math_reward("Answer: 0.5", r"\frac12", mode="answer") == 1.0
    with pytest.raises(ValueError, match="answer mode"):
        extract_answer("x", mode="final")


def test_long_and_adversarial_inputs_are_fast():
    math_reward(r"\boxed{1}", "1")  # the shared worker's start-up is not the check's time
    start = time.perf_counter()
    assert math_reward("blah " * 40_000 + r"\boxed{7}", "7") == 1.0
    assert math_reward(r"\boxed{" * 5_000, "7") == 0.0
    assert math_reward("{" * 100_000 + "}" * 99_999, "7") == 0.0
    assert math_reward("\\" * 100_001 + r"\boxed{7}", "7") == 1.0
    assert time.perf_counter() - start < 5.0


def test_one_sample_reward_has_the_scorer_time_limit():
    """``math_reward`` checks in a shared worker with the scorer's limit and 0 on timeout:
    a power tower and a deeply nested expression (each minutes in math-verify) score 0.0
    once the limit passes, their worker is replaced, and the next call is served."""
    import inspect

    from megatron_sppo.rewards import math as math_module

    limit = inspect.signature(math_reward).parameters["timeout_s"].default
    assert limit == RewardConfig().timeout_s
    assert math_reward(r"\boxed{1}", "1") == 1.0  # starts the shared worker
    pool = math_module._one_sample_pool()
    for slow in (r"\boxed{9^{9^{9^{9}}}}", r"\boxed{" + "(" * 300 + "x+1" + ")" * 300 + "}"):
        pid = pool._workers[0].proc.pid
        assert math_reward(slow, "5", timeout_s=0.5) == 0.0
        assert pool._workers[0].proc.pid != pid  # it ran out of time: its worker was killed
    assert math_reward(r"\boxed{5}", "5") == 1.0


def test_ground_truth_parsed_once_and_unparsable_compared_as_text():
    parse_ground_truth.cache_clear()
    for answer in ("0.5", r"\frac{1}{2}", "1/2"):
        assert check_answer(answer, parse_ground_truth(r"\frac12"))
    assert parse_ground_truth.cache_info().misses == 1
    gold = parse_ground_truth("}{")
    assert gold.parsed == [] and check_answer("}{", gold) and not check_answer("5", gold)


# ---- the pool ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    with WorkerPool(workers=2, timeout_s=2.0) as p:
        yield p


def test_pool_timeout_crash_and_recovery(pool):
    start = time.monotonic()
    result = pool.run([(operator.add, (1, 2)), (time.sleep, (60,)), (operator.mul, (3, 4)),
                       (os._exit, (3,)), (operator.neg, (5,))])
    assert result.values == [3, None, 12, None, -5]
    assert result.status == ["ok", "timeout", "ok", "crash", "ok"]
    assert (result.timeouts, result.errors, result.no_answer) == (1, 1, 0)
    assert time.monotonic() - start < 30  # the sleeping task did not hold the batch
    assert pool.run([(operator.add, (2, 2))]).values == [4]  # replaced workers serve


def test_pool_raises_task_error_with_index_and_stays_usable(pool):
    with pytest.raises(TaskError) as err:
        pool.run([(operator.add, (1, 1)), (operator.truediv, (1, 0)), (operator.add, (2, 2))])
    assert err.value.index == 1 and err.value.kind == "ZeroDivisionError"
    assert "ZeroDivisionError" in err.value.worker_traceback
    assert pool.run([(operator.add, (1, 1))]).values == [2]


def test_pathological_expression_times_out_without_hanging(pool):
    """sympy spends hours on a power tower; the pool gives up after its time limit."""
    records = [PromptRecord("q", "5"), PromptRecord("q", "5")]
    samples = [[_s(r"\boxed{9^{9^{9^{9}}}}")], [_s(r"\boxed{5}")]]
    start = time.monotonic()
    with RewardScorer(pool=pool) as scorer:
        out = scorer.score(records, samples)
    assert time.monotonic() - start < 30
    assert out.status == ["timeout", "correct"]
    assert out.rewards == [0.0, 1.0] and out.correctness == [0.0, 1.0]
    assert out.metrics["reward/timeouts"] == 1.0


def test_pool_under_load_keeps_order(pool):
    n = 1500
    records = [PromptRecord("q", str(i)) for i in range(n)]
    samples = [[_s(rf"\boxed{{{i if i % 3 else i + 1}}}")] for i in range(n)]
    start = time.monotonic()
    with RewardScorer(pool=pool) as scorer:
        out = scorer.score(records, samples)
    assert out.correctness == [0.0 if i % 3 == 0 else 1.0 for i in range(n)]
    assert out.metrics["reward/timeouts"] == 0.0
    assert time.monotonic() - start < 30


# ---- the registry --------------------------------------------------------------------------

def _s(text: str) -> Sample:
    return Sample(token_ids=[], logprobs=[], finish_reason="stop", text=text)


USER_MODULE = """
    import os

    def shaped(prompt, response, ground_truth, metadata):
        correct = response.strip() == ground_truth
        return {"score": (1.0 if correct else 0.0) - 0.001 * len(response),
                "correct": correct, "length": float(len(response))}

    def plain(prompt, response, ground_truth, metadata):
        return 2.0 if metadata.get("bonus") else 0.5

    def boom(prompt, response, ground_truth, metadata):
        if response == "bad":
            raise ValueError("cannot grade " + response)
        return True

    def crash(prompt, response, ground_truth, metadata):
        os._exit(7)

    def no_score(prompt, response, ground_truth, metadata):
        return {"length": 1.0}

    anonymous = lambda prompt, response, ground_truth, metadata: 1.0

    def library(prompt, response, ground_truth, metadata):
        from megatron_sppo.rewards import math_reward

        return math_reward(response, ground_truth)
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """A user reward module on sys.path (spawned workers inherit the parent's sys.path)."""
    import sys

    root = tmp_path_factory.mktemp("user_rewards")
    (root / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(root))
    yield "my_rewards"
    sys.path.remove(str(root))


def test_config_values_and_format_penalty(pool):
    cfg = RewardConfig(correct=1.0, incorrect=-1.0, no_answer=-0.5, format_penalty=0.25)
    records = [PromptRecord("q", "4")] * 4
    samples = [[_s(r"\boxed{4}")], [_s(r"\boxed{5}")], [_s("four")], [_s(r"\boxed{3} \boxed{4}")]]
    with RewardScorer(cfg, pool=pool) as scorer:
        out = scorer.score(records, samples)
    assert out.rewards == [1.0, -1.0, -0.5, 0.75]
    assert out.correctness == [1.0, 0.0, 0.0, 1.0]  # the critic's target stays 0/1
    assert out.status == ["correct", "incorrect", "no_answer", "correct"]
    assert out.metrics["reward/no_answer_rate"] == 0.25
    assert out.metrics["reward/format_violation_rate"] == pytest.approx(1 / 3)


def test_think_mode_and_dapo_route(pool):
    """math_dapo rows are checked the way their prompt asks: DAPO's own "Answer:" line (a
    box when there is none), or the box of the SPPO authors' rewrite."""
    from megatron_sppo.data.prompts import DAPO_HEAD, DAPO_INSTRUCTION, DAPO_TAIL

    asks_line = f"{DAPO_HEAD}\n\nFind $x$.\n\n{DAPO_TAIL}"
    asks_box = f"Find $x$. {DAPO_INSTRUCTION}"
    records = [PromptRecord("q", "5"), PromptRecord(asks_line, "5", data_source="math_dapo"),
               PromptRecord([{"role": "user", "content": asks_box}], "5", "math_dapo")]
    samples = [[_s(r"\boxed{5}"), _s(r"t </think> \boxed{5}")],
               [_s("t </think>\nAnswer: 5"), _s(r"t </think> \boxed{5}")],
               [_s("t </think>\nAnswer: 5"), _s(r"t </think> \boxed{5}")]]
    with RewardScorer(RewardConfig(require_think_close=True), pool=pool) as scorer:
        assert scorer.spec_for("math_dapo") == "math_auto"
        out = scorer.score(records, samples)
    assert out.status == ["no_answer", "correct", "correct", "correct", "no_answer", "correct"]


def test_user_functions_routed_by_data_source(pool, user_module):
    routes = {"shaped": f"{user_module}:shaped", "plain": f"{user_module}:plain"}
    records = [PromptRecord("q", "7", data_source="shaped"),
               PromptRecord("q", "7", data_source="plain", metadata={"bonus": True}),
               PromptRecord("q", "7", data_source="plain"),
               PromptRecord("q", "7")]
    samples = [[_s("7"), _s("8")], [_s("x")], [_s("x")], [_s(r"\boxed{7}")]]
    with RewardScorer(RewardConfig(routes=routes), pool=pool) as scorer:
        out = scorer.score(records, samples)
    assert out.rewards == pytest.approx([0.999, -0.001, 2.0, 0.5, 1.0])
    assert out.correctness == [1.0, 0.0, 1.0, 0.0, 1.0]  # a bare number is correct if >= 1
    assert out.metrics["reward/length"] == 1.0


def test_user_function_calling_math_reward_runs_in_the_scorers_worker(pool, user_module):
    """A reward worker is a daemon process that cannot start workers: there math_reward
    checks in place, under the scorer's own time limit."""
    records = [PromptRecord("q", "7", data_source="lib")] * 2
    with RewardScorer(routes={"lib": f"{user_module}:library"}, pool=pool) as scorer:
        out = scorer.score(records, [[_s(r"\boxed{7}")], [_s(r"\boxed{8}")]])
    assert out.status == ["correct", "incorrect"]


def test_user_function_errors_name_the_sample(pool, user_module):
    records = [PromptRecord("q", "1", data_source="gsm", index=40),
               PromptRecord("q", "1", data_source="gsm", index=41)]
    with RewardScorer(RewardConfig(routes={"gsm": f"{user_module}:boom"}), pool=pool) as scorer:
        with pytest.raises(RewardFunctionError) as err:
            scorer.score(records, [[_s("ok"), _s("fine")], [_s("ok"), _s("bad")]])
        assert isinstance(err.value, UserError)
        message = str(err.value)
        assert "sample 3" in message and "dataset index 41" in message
        assert "'gsm'" in message and "ValueError: cannot grade bad" in message
        assert "\n" not in message and "my_rewards.py" in message
        assert err.value.index == 3 and err.value.data_source == "gsm"
        # the pool is still usable afterwards
        assert scorer.score(records[:1], [[_s("ok")]]).rewards == [1.0]

    with RewardScorer(RewardConfig(function=f"{user_module}:no_score"), pool=pool) as scorer:
        with pytest.raises(RewardFunctionError, match="without 'score' or 'correct'"):
            scorer.score(records[:1], [[_s("ok")]])


def test_user_function_crash_is_counted_not_raised(pool, user_module):
    records = [PromptRecord("q", "1", data_source="bad"), PromptRecord("q", "1")]
    with RewardScorer(RewardConfig(routes={"bad": f"{user_module}:crash"}), pool=pool) as scorer:
        out = scorer.score(records, [[_s("x")], [_s(r"\boxed{1}")]])
    assert out.status == ["error", "correct"]
    assert out.metrics["reward/errors"] == 1.0


def test_bad_function_specs_fail_at_construction(user_module):
    for spec, match in [("no_colon", "package.module:function"),
                        ("missing_pkg_xyz:fn", "cannot be loaded"),
                        (f"{user_module}:absent", "cannot be loaded"),
                        (f"{user_module}:anonymous", "cannot be sent to worker processes")]:
        with pytest.raises(UserError, match=match):
            RewardScorer(RewardConfig(function=spec))


def test_shuffle_control_permutes_outcomes(pool):
    records = [PromptRecord("q", str(i)) for i in range(40)]
    samples = [[_s(rf"\boxed{{{i if i < 10 else -1}}}")] for i in range(40)]
    with RewardScorer(RewardConfig(shuffle=True), pool=pool) as scorer:
        first = scorer.score(records, samples)
        again = scorer.score(records, samples)
    assert sorted(first.rewards) == [0.0] * 30 + [1.0] * 10
    assert first.rewards != [1.0] * 10 + [0.0] * 30
    assert first.rewards == first.correctness == again.rewards  # deterministic


def test_unparsable_ground_truth_is_counted(pool):
    with RewardScorer(pool=pool) as scorer:
        out = scorer.score([PromptRecord("q", "}{")], [[_s(r"\boxed{5}")]])
    assert out.rewards == [0.0] and out.metrics["reward/gt_unparsed"] == 1.0


def test_trainer_config_section_with_overrides_drives_scoring(pool):
    from megatron_sppo.config.loader import apply_overrides, build_section

    tree = apply_overrides({"correct": 2}, ["format_penalty=0.5", "no_answer=-1"])
    cfg = build_section(RewardConfig, tree, "reward")
    with RewardScorer(cfg, pool=pool) as scorer:
        out = scorer.score([PromptRecord("q", "4")] * 2,
                           [[_s(r"\boxed{4} \boxed{4}")], [_s("none")]])
    assert out.rewards == [1.5, -1.0]
