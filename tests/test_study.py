"""The study's pieces: the running-mean baseline that replaces SPPO's critic in the ablation
(hand-computed means and logits), and the study table's time/tokens-to-target arithmetic on
hand-made evaluation points."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from helpers import REPO

from megatron_sppo.trainer.rl_step import StepBatch, clamped_logit, running_mean_baseline


def _study():
    spec = importlib.util.spec_from_file_location("study", REPO / "examples" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(outcomes):
    n = len(outcomes)
    return StepBatch(tensors=None, group_index=torch.arange(n), rewards=torch.tensor(outcomes),
                     correctness=torch.tensor(outcomes), truncated=torch.zeros(n, dtype=bool),
                     loss_mask=None)


def test_running_mean_baseline_uses_past_batches_only():
    state = {}
    first = _batch([1.0, 0.0, 0.0, 0.0])
    running_mean_baseline(state, first, momentum=0.9)
    assert torch.allclose(first.critic_logits, torch.full((4,), math.log(0.25 / 0.75)))
    assert state["baseline_mean"] == pytest.approx(0.25)
    second = _batch([1.0, 1.0, 1.0, 1.0])
    running_mean_baseline(state, second, momentum=0.9)  # V from the past: still 0.25
    assert torch.allclose(second.critic_logits, torch.full((4,), math.log(1 / 3)))
    assert state["baseline_mean"] == pytest.approx(0.9 * 0.25 + 0.1 * 1.0)
    assert clamped_logit(1.0, 0.02) == pytest.approx(math.log(0.98 / 0.02))


def _pt(step, seconds, tokens, sampled, greedy):
    return {"step": step, "seconds": seconds, "tokens": tokens, "pass1_sampled": sampled,
            "pass1_greedy": greedy}


def test_table_time_and_tokens_to_target():
    study = _study()
    runs = {1: {"points": [_pt(0, 0.0, 0.0, 0.4, 0.7), _pt(10, 12.0, 900.0, 0.7, 0.8)]},
            2: {"points": [_pt(0, 0.0, 0.0, 0.4, 0.7), _pt(10, 10.0, 800.0, 0.6, 0.7)]}}
    # the crossing of 0.65 is interpolated between the evaluations around it: 5/6 of the way
    assert study.reaching(runs[1]["points"], "seconds", 0.65) == pytest.approx(10.0)
    assert study.reaching(runs[1]["points"], "tokens", 0.65) == pytest.approx(750.0)
    assert study.reaching(runs[2]["points"], "seconds", 0.65) is None
    assert study.reaching(runs[1]["points"], "seconds", 0.3) == 0.0
    row = study.table({"m": runs}, 0.65).splitlines()[2]
    assert row.startswith("| m | 0.65 ± 0.071 | 0.75 ± 0.071 | 10 (1/2 seeds) | 750 (1/2 seeds) |")


def test_targets_compare_selection_with_sppo_and_dynamic_sampling():
    study = _study()

    def runs(tokens, seconds):
        return {1: {"points": [_pt(0, 0.0, 0.0, 0.2, 0.4),
                               _pt(10, seconds, tokens, 0.5, 0.5)]}}

    text = study.targets({"sppo_selection": runs(600.0, 20.0), "sppo": runs(1000.0, 30.0),
                          "grpo_dynamic_sampling": runs(900.0, 10.0)}, 0.35)
    assert text.splitlines() == [
        "- against sppo: 0.60x the generated tokens (target <= 0.7x), 10.0 s against 15.0 s "
        "of training: met",
        "- against grpo_dynamic_sampling: 0.67x the generated tokens (target <= 0.6x), 10.0 s "
        "against 5.0 s of training: not met"]
