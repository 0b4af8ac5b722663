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


def test_table_time_and_tokens_to_target():
    study = _study()
    def pt(step, seconds, tokens, sampled, greedy):
        return {"step": step, "seconds": seconds, "tokens": tokens, "pass1_sampled": sampled,
                "pass1_greedy": greedy}

    runs = {1: [pt(0, 0.0, 0.0, 0.4, 0.7), pt(10, 12.0, 900.0, 0.7, 0.8)],
            2: [pt(0, 0.0, 0.0, 0.4, 0.7), pt(10, 10.0, 800.0, 0.6, 0.7)]}
    assert study.first_reaching(runs[1], "seconds", 0.65) == 12.0
    assert study.first_reaching(runs[2], "seconds", 0.65) is None
    row = study.table({"m": runs}, 0.65).splitlines()[2]
    assert row.startswith("| m | 0.65 ± 0.071 | 0.75 ± 0.071 | 12 (1/2 seeds) | 900 (1/2 seeds) |")
