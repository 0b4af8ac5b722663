"""Critic-guided prompt selection and DAPO's dynamic sampling, without a model: the selection
rules on hand-made pools (chosen set, exploration share, determinism per seed, the weighted
draw's frequencies against the exact inclusion probability), the prompt stream's
conservation across selection and resume, and dynamic sampling's batch filling and token
count with a scripted engine and scorer."""

from __future__ import annotations

import itertools
import math
import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from helpers import torchrun

from megatron_sppo.algorithms.selection import (AlgorithmInputError, expected_signal,
                                                informative_groups, select_prompts)
from megatron_sppo.config import load_config
from megatron_sppo.data.prompts import PromptIterator, PromptRecord
from megatron_sppo.errors import UserError
from megatron_sppo.rewards.registry import Scored
from megatron_sppo.rollout.engine import Sample

POOL = torch.tensor([0.01, 0.5, 0.99, 0.3, 0.7, 0.0, 0.9, 0.2, 0.6, 1.0])


def _choose(rule, k=4, exploration=0.0, seed=0, values=POOL, **kw):
    return select_prompts(values, k, rule=rule, exploration=exploration,
                          generator=torch.Generator().manual_seed(seed), **kw)


def test_topk_and_filter_choose_by_expected_signal_inside_the_band():
    # V(1 - V): 0.25 (1), 0.24 (8), 0.21 (3, 4), 0.16 (7), 0.09 (6), ~0.01 (0, 2), 0 (5, 9)
    top = _choose("topk")
    assert top.chosen == [1, 3, 4, 8]
    assert top.skipped == [0, 2, 5, 6, 7, 9] and top.explored == []
    assert (top.too_hard, top.too_easy) == (2, 2)  # 0.01, 0.0 below 0.05; 0.99, 1.0 above 0.95
    band = {1, 3, 4, 6, 7, 8}
    for seed in range(20):
        assert set(_choose("filter", seed=seed).chosen) <= band
        assert set(_choose("weighted", seed=seed).chosen) <= band
    # a narrow band holding two prompts: the other two are the out-of-band prompts nearest it
    narrow = _choose("filter", floor=0.45, ceiling=0.55)
    assert narrow.chosen == [1, 3, 4, 8]
    assert _choose("filter", floor=0.45, ceiling=0.55, k=2).chosen == [1, 8]


def test_exploration_share_is_uniform_over_the_whole_pool_and_seeded():
    values = torch.cat([torch.zeros(50), torch.full((50,), 0.5)])  # half hopeless
    counts = Counter()
    for seed in range(400):
        s = _choose("weighted", k=10, exploration=0.3, seed=seed, values=values)
        assert len(s.chosen) == 10 and len(s.explored) == 3
        assert set(s.explored) <= set(s.chosen)
        assert sorted(s.chosen + s.skipped) == list(range(100))
        picked = set(s.chosen) - set(s.explored)
        assert all(i >= 50 for i in picked)  # the rule never takes V = 0 while the band has room
        counts.update(s.explored)
    hopeless = sum(counts[i] for i in range(50)) / sum(counts.values())
    assert hopeless == pytest.approx(0.5, abs=0.05)  # exploration ignores V
    a = _choose("weighted", k=10, exploration=0.3, seed=5, values=values)
    b = _choose("weighted", k=10, exploration=0.3, seed=5, values=values)
    c = _choose("weighted", k=10, exploration=0.3, seed=6, values=values)
    assert a == b and a.chosen != c.chosen
    assert _choose("topk", k=4, exploration=0.5).explored == _choose(
        "filter", k=4, exploration=0.5).explored  # the same draw for every rule


def _inclusion_probabilities(weights: list[float], k: int) -> list[float]:
    """Exact P(item chosen) for k successive draws without replacement, each proportional
    to the remaining weights (enumerating every ordered draw)."""
    n, total = len(weights), [0.0] * len(weights)
    for order in itertools.permutations(range(n), k):
        p, left = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        for i in order:
            total[i] += p
    return total


def test_weighted_draw_follows_successive_proportional_sampling():
    values = torch.tensor([0.5, 0.3, 0.1, 0.8, 0.06])
    weights = expected_signal(values.double()).tolist()
    exact = _inclusion_probabilities(weights, 2)
    trials = 4000
    counts = Counter()
    for seed in range(trials):
        counts.update(_choose("sample", k=2, seed=seed, values=values).chosen)
    for i, p in enumerate(exact):
        assert counts[i] / trials == pytest.approx(p, abs=0.03), (i, p)


def test_bad_selection_settings_are_one_line_errors():
    with pytest.raises(AlgorithmInputError, match="rule 'best'"):
        _choose("best")
    with pytest.raises(AlgorithmInputError, match="0 <= floor < ceiling <= 1"):
        _choose("weighted", floor=0.6, ceiling=0.4)
    with pytest.raises(AlgorithmInputError, match="cannot choose 11 prompts from a pool of 10"):
        _choose("weighted", k=11)
    base = ["policy.checkpoint=x"]
    with pytest.raises(UserError, match="algorithm.selection: selection exploration=2"):
        load_config(None, [*base, "algorithm.selection.exploration=2"])
    with pytest.raises(UserError, match="prompt_selection=true needs the SPPO critic"):
        load_config(None, [*base, "algorithm.prompt_selection=true",
                           "algorithm.sppo_baseline=running_mean"])
    with pytest.raises(UserError, match="dynamic_sampling=true is for the group estimators"):
        load_config(None, [*base, "algorithm.dynamic_sampling=true"])


def _records(n):
    return [PromptRecord(f"p{i}", str(i), index=i) for i in range(n)]


def _fresh_prefix(n: int, seed: int, count: int) -> Counter:
    """The first ``count`` prompts of the epoch orders (independent of the iterator)."""
    out: list[int] = []
    for epoch in itertools.count():
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out += order
        if len(out) >= count:
            return Counter(out[:count])


def _selection_steps(it: PromptIterator, steps: range, k=3, factor=3) -> list[list[int]]:
    """The trainer's use of the stream: draw a pool, choose, give the skipped back."""
    chosen = []
    for step in steps:
        positions = it.draw(k * factor)
        values = torch.tensor([(p * 37 % 11) / 10 for p in positions])  # a fixed "critic"
        s = select_prompts(values, k, exploration=0.34,
                           generator=torch.Generator().manual_seed(step))
        it.give_back([positions[i] for i in s.skipped])
        chosen.append([positions[i] for i in s.chosen])
    return chosen


def test_stream_loses_and_duplicates_nothing_across_selection_and_resume():
    n, seed = 10, 5
    whole = PromptIterator(_records(n), seed=seed)
    expected = _selection_steps(whole, range(12))
    trained = Counter(i for batch in expected for i in batch)
    assert trained + Counter(whole.returned) == _fresh_prefix(
        n, seed, whole.epoch * n + whole.position)
    assert sum(trained.values()) == 36 and whole.epoch >= 2  # past two epoch boundaries
    # what is given back comes after the epoch's own order, before the next epoch's
    it = PromptIterator(_records(n), shuffle=False)
    assert it.draw(8) == list(range(8))
    it.give_back([6, 1, 3])
    assert it.draw(6) == [8, 9, 6, 1, 3, 0] and it.epoch == 1

    it = PromptIterator(_records(n), seed=seed)
    got = _selection_steps(it, range(5))
    state = json.loads(json.dumps(it.state_dict()))  # as the checkpoint stores it
    assert state["returned"] == it.returned
    resumed = PromptIterator(_records(n), seed=seed)
    resumed.load_state_dict(state)
    got += _selection_steps(resumed, range(5, 12))
    assert got == expected


def test_trainer_selection_gives_the_skipped_back_and_reports(monkeypatch):
    from megatron_sppo.trainer import rl_step, selection

    cfg = load_config(None, ["policy.checkpoint=x", "algorithm.prompt_selection=true",
                             "trainer.prompts_per_step=4", "algorithm.selection.pool_factor=3",
                             "algorithm.selection.exploration=0"])
    logits = torch.tensor([-9.0, 0.0, 9.0, 0.5, -0.5, 1.0, -8.0, 8.0, 0.2, -1.0, 2.0, 4.0])
    seen = {}

    def pool_logits(critic, ids, lengths, cfg_):
        seen["rows"] = ids.shape[0]
        return logits[ids[:, 0] - 100]  # the scripted critic reads the prompt's position

    monkeypatch.setattr(rl_step, "prompt_critic_logits", pool_logits)
    it = PromptIterator(_records(12), shuffle=False)
    c = SimpleNamespace(prompts=it, critic=None,
                        critic_inputs=lambda recs: (torch.tensor([[100 + r.index, 1]
                                                                  for r in recs]),
                                                    torch.full((len(recs),), 2)))
    out = selection.select_step_prompts(c, cfg, seed=1)
    assert seen["rows"] == 12
    chosen = sorted(r.index for r in out.records)
    assert set(chosen) <= {1, 3, 4, 5, 8, 9, 10}  # V inside [0.05, 0.95]
    assert torch.equal(out.critic_logits, logits[chosen])
    assert sorted(it.returned) == sorted(set(range(12)) - set(chosen))
    m = out.metrics
    assert m["selection_pool_size"] == 12
    assert m["selection_skipped_too_hard"] == pytest.approx(2 / 12)  # logits -9, -8
    assert m["selection_skipped_too_easy"] == pytest.approx(3 / 12)  # 9, 8, 4
    v = torch.sigmoid(logits.double())
    assert m["selection_value_chosen"] == pytest.approx(v[chosen].mean().item())


def test_informative_groups():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5])
    assert informative_groups(rewards, 3).tolist() == [False, True, False, False]
    with pytest.raises(AlgorithmInputError, match="groups of 5"):
        informative_groups(rewards, 5)


class ScriptedRollouts:
    """Engine and scorer in one: prompt "p<i>" is solved by its samples j where
    ``solved(i, j)``; sample j of prompt i has i % 3 + 1 + j tokens."""

    def __init__(self, solved):
        self.solved, self.calls = solved, []

    def generate(self, records, seed):
        self.calls.append((len(records), seed))
        n = 4
        return {"samples": [[Sample([7] * (r.index % 3 + 1 + j), [0.0] * (r.index % 3 + 1 + j),
                                    "stop", text=f"{r.index}:{j}") for j in range(n)]
                            for r in records]}

    def score(self, records, rollouts):
        right = [float(self.solved(r.index, j)) for r, per in zip(records, rollouts["samples"])
                 for j, _ in enumerate(per)]
        return Scored(right, right, ["correct" if x else "incorrect" for x in right],
                      {"reward/timeouts": 1.0, "reward/no_answer_rate": 0.5})


def _dynamic_components(solved, *overrides):
    cfg = load_config(None, ["policy.checkpoint=x", "algorithm.estimator=grpo", "rollout.n=4",
                             "trainer.prompts_per_step=4", "algorithm.dynamic_sampling=true",
                             *overrides])
    script = ScriptedRollouts(solved)
    c = SimpleNamespace(prompts=PromptIterator(_records(100), shuffle=False),
                        generate=script.generate, score=script.score,
                        colocation=SimpleNamespace(for_rollout=lambda: None,
                                                   for_training=lambda **_: None))
    return cfg, c, script


def _timer():
    from megatron_sppo.trainer.loop import PhaseTimer

    return PhaseTimer()


def _tokens(indices, n=4):
    return sum(i % 3 + 1 + j for i in indices for j in range(n))


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    from megatron_sppo.trainer.sampling import generate_and_score

    # prompts 0..99 in order; every third (0, 3, 6, ...) is informative (one sample right)
    cfg, c, script = _dynamic_components(lambda i, j: i % 3 == 0 and j == 0)
    got = generate_and_score(c, cfg, c.prompts.next_batch(4), seed=11, timer=_timer())
    # round 1: 0..3 -> {0, 3}; rate 2/4, 2 missing -> 4 more: 4..7 -> {6};
    # rate 3/8, 1 missing -> 3 more: 8..10 -> {9}
    assert [r.index for r in got.records] == [0, 3, 6, 9]
    assert [n for n, _ in script.calls] == [4, 4, 3]
    assert script.calls[0][1] == 11 and len({s for _, s in script.calls}) == 3
    assert got.generated_tokens == _tokens(range(11))  # dropped groups counted too
    assert got.scored.rewards == [1.0, 0, 0, 0] * 4
    assert [s.text for per in got.rollouts["samples"] for s in per][:5] == [
        "0:0", "0:1", "0:2", "0:3", "3:0"]
    assert got.metrics == {"dynamic_sampling_rounds": 3.0, "dynamic_sampling_groups": 11.0,
                           "dynamic_sampling_informative_fraction": 4 / 11,
                           "dynamic_sampling_filled": 0.0}
    assert got.scored.metrics == {"reward/timeouts": 3.0, "reward/no_answer_rate": 0.5}
    assert c.prompts.next_batch(1)[0].index == 11  # consumed, dropped ones included


def test_dynamic_sampling_stops_after_its_rounds_and_fills_with_dropped_groups():
    from megatron_sppo.trainer.sampling import generate_and_score

    cfg, c, script = _dynamic_components(lambda i, j: i == 2 and j == 1,
                                         "algorithm.dynamic_sampling_max_rounds=2")
    got = generate_and_score(c, cfg, c.prompts.next_batch(4), seed=0, timer=_timer())
    # round 1 keeps {2}; rate 1/4 -> 12 more (4..15), none informative; stop after 2 rounds
    assert [n for n, _ in script.calls] == [4, 12]
    assert [r.index for r in got.records] == [2, 13, 14, 15]  # the latest dropped fill
    assert got.metrics["dynamic_sampling_filled"] == 3.0
    assert got.generated_tokens == _tokens(range(16))
    cfg, c, script = _dynamic_components(lambda i, j: i == 2 and j == 1,
                                         "algorithm.dynamic_sampling=false")
    plain = generate_and_score(c, cfg, c.prompts.next_batch(4), seed=0, timer=_timer())
    assert [r.index for r in plain.records] == [0, 1, 2, 3] and plain.metrics == {}
    assert plain.generated_tokens == _tokens(range(4))


@pytest.fixture(scope="module")
def pool_tp1(zoo):
    (result,) = torchrun("critic_pool.py", 1, zoo["qwen2_gqa_untied"])
    return result


def test_critic_pool_forward_equals_the_step_values_and_hf(pool_tp1):
    assert pool_tp1["tp"] == 1 and pool_tp1["spread"] > 0.05  # the prompts' values differ
    assert pool_tp1["step_diff"] <= 1e-6
    assert pool_tp1["reference_diff"] <= 1e-5


def test_critic_pool_forward_at_tp2_equals_tp1(zoo, pool_tp1):
    results = torchrun("critic_pool.py", 2, zoo["qwen2_gqa_untied"], "--tp", "2")
    assert len(results) == 2
    for r in results:
        assert r["tp"] == 2
        assert r["step_diff"] <= 1e-6 and r["reference_diff"] <= 1e-5
        assert r["pool"] == pytest.approx(pool_tp1["pool"], abs=1e-5)


def test_held_out_diagnostics_of_the_critic_ranking():
    from megatron_sppo.trainer.evaluation import selection_eval_metrics

    v = torch.tensor([0.02, 0.03, 0.5, 0.6, 0.96, 0.99], dtype=torch.float64)
    outcomes = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1],
                             [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.float32)
    m = selection_eval_metrics(torch.logit(v), outcomes, floor=0.05, ceiling=0.95)
    # V < 0.05: prompts 0 (never solved: right) and 1 (solved once); V > 0.95: 4 (always
    # solved: right) and 5
    assert m["selection_too_hard_right"] == m["selection_too_easy_right"] == 0.5
    assert m["selection_too_hard_share"] == m["selection_too_easy_share"] == pytest.approx(1 / 3)
    signal = (v * (1 - v)).tolist()
    mixed, agree = [1, 2, 5], [0, 3, 4]
    wins = sum(signal[i] > signal[j] for i in mixed for j in agree)  # no ties here
    assert m["selection_signal_auc"] == pytest.approx(wins / 9)
    none = selection_eval_metrics(torch.zeros(2), outcomes[:2], floor=0.05, ceiling=0.95)
    assert math.isnan(none["selection_too_hard_right"])
