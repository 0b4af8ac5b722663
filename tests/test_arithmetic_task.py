"""The synthetic arithmetic task of the CPU demo (pure Python, no model)."""

import json
import random
from collections import Counter

import pytest

from megatron_sppo.data import arithmetic as ar
from megatron_sppo.errors import UserError
from megatron_sppo.models.tiny import ALPHABET


def test_problems_are_deterministic_in_the_seed():
    a = ar.make_sft_records(300, seed=3, corrupt=0.4)
    assert a == ar.make_sft_records(300, seed=3, corrupt=0.4)
    assert a != ar.make_sft_records(300, seed=4, corrupt=0.4)
    b = ar.make_prompt_records(200, split="heldout", seed=1)
    assert b == ar.make_prompt_records(200, split="heldout", seed=1)


def test_splits_are_disjoint_whatever_the_seeds():
    train = {r["prompt"] for s in range(3) for r in ar.make_sft_records(2000, seed=s, corrupt=0.5)}
    train |= {r["prompt"] for s in range(3)
              for r in ar.make_prompt_records(2000, split="train", seed=s)}
    heldout = {r["prompt"] for s in range(3)
               for r in ar.make_prompt_records(400, split="heldout", seed=s)}
    assert train and heldout and not train & heldout
    assert all(ar.split_of(p) == "train" for p in train)
    assert all(ar.split_of(p) == "heldout" for p in heldout)
    # the split is a function of the text alone, about heldout_fraction of all problems
    rng = random.Random(0)
    texts = {ar.sample_problem(rng, lv).prompt for lv in ar.LEVELS for _ in range(2000)}
    share = sum(ar.split_of(t) == "heldout" for t in texts) / len(texts)
    assert 0.17 < share < 0.23


def test_heldout_problems_are_distinct():
    recs = ar.make_prompt_records(800, split="heldout", seed=0)
    assert len({r["prompt"] for r in recs}) == 800


def test_answers_are_correct_and_partial_results_non_negative():
    for r in ar.make_prompt_records(1000, split="train", seed=0):
        expr = r["prompt"].removesuffix("=?")
        assert int(r["answer"]) == eval(expr)  # left to right is Python's order for + and -
        assert r["data_source"] == "arithmetic" and r["level"] in ar.LEVELS
    for lv in ar.LEVELS:
        for p in ar.generate_problems(200, split="train", seed=1, levels={lv: ar.LEVELS[lv]}):
            assert all(res >= 0 for *_, res in p.steps())
            assert len(p.numbers) == ar.LEVELS[lv].operands
            assert all(0 <= n < 10 ** ar.LEVELS[lv].digits for n in p.numbers)


def _parse_lines(response):
    """[(left, right_expr_value, shown_result)] per step line, and the boxed value."""
    lines = response.split("\n")
    steps = []
    for line in lines[:-1]:
        lhs, result = line.split("=")
        i = next(i for i in range(1, len(lhs)) if lhs[i] in "+-")
        steps.append((int(lhs[:i]), eval(lhs), int(result)))
    assert lines[-1] == f"\\boxed{{{ar.boxed_answer(response)}}}"
    return steps, int(ar.boxed_answer(response))


@pytest.mark.parametrize("slip", ar.SLIPS)
def test_clean_demonstrations_are_right_and_corrupted_ones_wrong(slip):
    recs = ar.make_sft_records(2000, seed=0, corrupt=0.5, slip=slip)
    for r in recs:
        assert ar.is_correct(r["response"], r["answer"]) != r["corrupted"]
        steps, boxed = _parse_lines(r["response"])
        assert all(left >= 0 and shown >= 0 for left, _, shown in steps)
        wrong_results = sum(value != shown for _, value, shown in steps)
        carried = [left for left, _, _ in steps[1:]] + [boxed]
        wrong_copies = sum(c != shown for c, (_, _, shown) in zip(carried, steps))
        # clean: every line true and carried on; corrupted: exactly one slip of the chosen kind
        slips = {"copy": (wrong_copies, wrong_results), "arithmetic": (wrong_results, wrong_copies)}
        assert slips[slip] == ((1, 0) if r["corrupted"] else (0, 0))


def test_demonstration_format():
    p = ar.Problem((12, 7, 5, 3), ("+", "-", "+"), level=4)
    assert p.prompt == "12+7-5+3=?" and p.answer == 17
    assert ar.demonstration(p) == "12+7=19\n19-5=14\n14+3=17\n\\boxed{17}"
    assert p.record() == {"prompt": "12+7-5+3=?", "answer": "17", "level": 4,
                          "data_source": "arithmetic"}
    with pytest.raises(UserError, match="needs an rng"):
        ar.demonstration(p, corrupt=True)
    with pytest.raises(UserError, match="slip="):
        ar.demonstration(p, slip="typo")
    rng = random.Random(0)
    wrong = {ar.demonstration(p, corrupt=True, rng=rng, slip="copy") for _ in range(50)}
    assert "12+7=19\n21-5=16\n16+3=19\n\\boxed{19}" in wrong  # 19 carried on as 21


@pytest.mark.parametrize("corrupt", [0.0, 0.25, {1: 0.1, 2: 0.3, 3: 0.5, 4: 0.7}])
def test_corrupted_fraction_per_level_as_configured(corrupt):
    recs = ar.make_sft_records(1000, seed=2, corrupt=corrupt)
    for lv in ar.LEVELS:
        mine = [r for r in recs if r["level"] == lv]
        want = corrupt if isinstance(corrupt, float) else corrupt[lv]
        assert sum(r["corrupted"] for r in mine) == round(want * len(mine))


def test_every_character_is_in_the_tokenizer_alphabet():
    chars = set()
    for r in ar.make_sft_records(2000, seed=0, corrupt=0.5):
        chars |= set(r["prompt"]) | set(r["response"]) | set(r["answer"])
    assert chars <= set(ALPHABET), chars - set(ALPHABET)


def test_levels_are_balanced():
    for n in (400, 1001):
        counts = Counter(r["level"] for r in ar.make_prompt_records(n, split="heldout", seed=0))
        assert sorted(counts) == sorted(ar.LEVELS)
        assert max(counts.values()) - min(counts.values()) <= 1
    counts = Counter(r["level"] for r in ar.make_sft_records(999, seed=0))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_custom_levels_and_bad_arguments():
    levels = {1: ar.Level(operands=2, digits=1, ops="+"), 7: ar.Level(operands=5, digits=1)}
    recs = ar.make_prompt_records(40, split="train", seed=0, levels=levels)
    assert {r["level"] for r in recs} == {1, 7}
    assert all("-" not in r["prompt"] for r in recs if r["level"] == 1)
    with pytest.raises(UserError, match="too few distinct heldout problems"):
        ar.make_prompt_records(200, split="heldout", seed=0, levels={1: levels[1]})
    with pytest.raises(UserError, match="split="):
        ar.make_prompt_records(10, split="test", seed=0)
    with pytest.raises(UserError, match=r"not in \[1, 7\]"):
        ar.make_sft_records(10, seed=0, corrupt={3: 0.5}, levels=levels)
    with pytest.raises(UserError, match="must lie in"):
        ar.make_sft_records(10, seed=0, corrupt=1.5)
    with pytest.raises(UserError, match="ops="):
        ar.Level(operands=2, digits=1, ops="*")
    with pytest.raises(UserError, match="operands="):
        ar.Level(operands=1, digits=1)


def test_answer_check():
    assert ar.is_correct("3+4=7\n\\boxed{7}", "7")
    assert not ar.is_correct("\\boxed{7}\n\\boxed{8}", 7)  # the last box counts
    assert not ar.is_correct("3+4=7", "7")
    assert ar.boxed_answer("x \\boxed{12} y") == "12"


def test_jsonl_roundtrip(tmp_path):
    recs = ar.make_sft_records(50, seed=0, corrupt=0.2)
    path = ar.write_jsonl(recs, tmp_path / "sub" / "sft.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and json.loads(lines[0]) == recs[0]
    assert ar.read_jsonl(path) == recs


def test_max_response_chars_bounds_every_demonstration():
    recs = ar.make_sft_records(4000, seed=0, corrupt=0.5)
    for lv, spec in ar.LEVELS.items():
        longest = max(len(r["response"]) for r in recs if r["level"] == lv)
        assert longest <= ar.max_response_chars({lv: spec}) <= longest + 4
    assert ar.max_response_chars() == max(ar.max_response_chars({k: v})
                                          for k, v in ar.LEVELS.items())


def test_graded_task_levels_ranges_and_lengths():
    graded = ar.TASKS["graded"]
    recs = ar.make_sft_records(2400, seed=0, corrupt=0.5, levels=graded)
    for lv, spec in graded.items():
        low, high = spec.first_range
        problems = ar.generate_problems(300, split="train", seed=2, levels={lv: spec},
                                        unique=False)
        assert all(low <= p.numbers[0] <= high and len(p.numbers) == spec.operands
                   and all(n < 10 ** spec.digits for n in p.numbers[1:]) for p in problems)
        longest = max(len(r["response"]) for r in recs if r["level"] == lv)
        assert longest <= ar.max_response_chars({lv: spec}) <= longest + 4
    # the demo config's response limit (48 tokens, one a character plus end of turn) fits
    assert ar.max_response_chars(graded) < 48
    held = ar.make_prompt_records(200, split="heldout", seed=0, levels=graded)
    assert Counter(r["level"] for r in held) == {lv: 25 for lv in graded}
    assert ar.TASKS["demo"] is ar.LEVELS
    with pytest.raises(UserError, match=r"first=\(5, 3\)"):
        ar.Level(operands=2, digits=1, first=(5, 3))
