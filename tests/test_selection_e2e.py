"""`megatron-sppo train` with critic-guided prompt selection and with DAPO's dynamic sampling,
end to end on CPU (tiny random policy, built-in arithmetic task): selection's metrics and
a run resumed from a checkpoint choosing exactly what the uninterrupted run chose (the pool,
the stream and what went back to it are restored); dynamic sampling's extra rounds and its
token count, dropped groups included. The resumed run and the dynamic-sampling run run
under the strict emulated-GPU mode: every tensor reaching a model is on its device."""

from __future__ import annotations

import math

import pytest
from helpers import run
from test_trainer_e2e import metrics, train_cmd, write_config

STRICT = {"MEGATRON_SPPO_EMULATE_GPU": "1"}

SELECTION = {"algorithm": {"prompt_selection": True,
                           "selection": {"pool_factor": 3, "exploration": 0.25}},
             "trainer": {"total_steps": 3, "eval_interval": 3, "save_interval": 2}}


def test_selection_metrics_and_exact_resume(zoo, tmp_path):
    config = write_config(tmp_path, zoo["qwen2_gqa_untied"], **SELECTION)
    whole = tmp_path / "whole"
    run(train_cmd(config, whole))
    m = metrics(whole)
    for step in (1, 2, 3):
        assert m[step]["selection_pool_size"] == 24  # 3 x 8 prompts
        assert m[step]["selection_explored"] == 2  # round(0.25 x 8)
        assert m[step]["time_selection"] > 0 and m[step]["selection_critic_seconds"] > 0
        assert math.isfinite(m[step]["selection_value_chosen"])
        assert m[step]["generated_tokens"] == pytest.approx(
            8 * m[step]["response_length_mean"])
    assert m[3]["train_seconds"] == pytest.approx(sum(
        v for r in m.values() for k, v in r.items() if k.startswith("time_")))
    assert "eval/selection_signal_auc" in m[3] and "eval/selection_too_hard_share" in m[3]

    resumed = tmp_path / "resumed"
    run(train_cmd(config, resumed, "--resume", str(whole / "checkpoints" / "step_0000002")),
        env=STRICT)
    again = metrics(resumed)
    assert sorted(again) == [3]
    for key, value in m[3].items():
        if not key.startswith("time_") and key not in (
                "tokens_per_second", "train_seconds", "selection_critic_seconds"):
            assert again[3][key] == value, key


def test_dynamic_sampling_counts_every_generated_token(zoo, tmp_path):
    # a random policy never answers: every group's rewards are equal, so each step runs its
    # two rounds (4 + 32 prompts) and fills the batch with dropped groups
    config = write_config(tmp_path, zoo["qwen2_gqa_untied"],
                          algorithm={"estimator": "grpo", "dynamic_sampling": True,
                                     "dynamic_sampling_max_rounds": 2},
                          rollout={"n": 2},
                          trainer={"total_steps": 2, "prompts_per_step": 4,
                                   "mini_batch_size": 2, "eval_interval": 0})
    out = tmp_path / "ds"
    run(train_cmd(config, out), env=STRICT)
    for step, r in metrics(out).items():
        assert r["dynamic_sampling_rounds"] == 2 and r["dynamic_sampling_filled"] == 4
        assert r["dynamic_sampling_groups"] == 4 + 32  # 8 x the 4 missing in round 2
        # the batch holds 4 x 2 responses; the count covers all 36 x 2 generated
        assert r["generated_tokens"] > 8 * r["response_length_mean"]
        assert r["generated_tokens"] <= 72 * 12  # at most max_response_length each
