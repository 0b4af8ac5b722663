"""The trainer's Megatron step functions (critic values with the head bias set from the first
batch, old log-probs, SPPO advantages, the critic's BCE step and the policy's PPO steps over
2 mini-batches x 2 epochs) give the same losses, grad norms and weights at TP=2, PP=2 and DP=2
as in one process, the critic at another layout than the policy on the same ranks (its own
process groups) or at the same; a training checkpoint reloads models, optimizers and
schedulers exactly."""

from __future__ import annotations

import math

import pytest
from helpers import torchrun

# policy layout x critic layout on two ranks; where they differ the critic runs on process
# groups of its own (policy TP=2 beside critic TP=1 x DP=2 is the paper's 7B + 1.5B shape)
LAYOUTS = {"tp2_critic_pp2": ("--tp", "2", "--critic-tp", "1", "--critic-pp", "2"),
           "pp2_critic_tp2": ("--pp", "2", "--critic-tp", "2", "--critic-pp", "1"),
           "tp2_critic_tp1": ("--tp", "2", "--critic-tp", "1"),
           "dp2": ("--max-tokens", "64")}
# [tp, pp, dp] of policy and critic
EXPECTED = {"tp2_critic_pp2": ([2, 1, 1], [1, 2, 1]), "pp2_critic_tp2": ([1, 2, 1], [2, 1, 1]),
            "tp2_critic_tp1": ([2, 1, 1], [1, 1, 2]), "dp2": ([1, 1, 2], [1, 1, 2])}


@pytest.fixture(scope="module")
def single(zoo, tmp_path_factory):
    (result,) = torchrun("rl_update.py", 1, zoo["qwen2_gqa_untied"],
                         tmp_path_factory.mktemp("rl") / "tp1")
    return result


def test_single_process_step(single):
    # head bias = logit of the batch's success rate 3/8
    assert single["bias"] == pytest.approx(math.log(3 / 5))
    assert single["critic_logit0"] == pytest.approx(math.log(3 / 5), abs=1e-6)
    # BCE starts at the entropy of a 3/8 coin (0.6616) and falls during the step
    assert 0.55 < single["critic_loss"] < 0.6616
    assert single["clip_fraction"] > 0 and single["grad_norm"] > 0
    assert single["replicas"] == 1


def test_checkpoint_reload_is_exact(single):
    assert single["run_step"] == 1 and single["run_note"] == "x" and single["lr"] == 1e-3
    # the reloaded models took the same next update as the originals: same weights,
    # same Adam moments, same scheduler
    assert single["second_loss"][0] == single["second_loss"][1]
    assert single["reloaded_digest"] == single["after_digest"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_agree(zoo, single, tmp_path, layout):
    results = torchrun("rl_update.py", 2, zoo["qwen2_gqa_untied"], tmp_path / "out",
                       *LAYOUTS[layout])
    assert results
    for r in results:
        assert (r["policy_layout"], r["critic_layout"]) == EXPECTED[layout]
        for key in ("critic_loss", "critic_grad_norm", "policy_loss", "grad_norm",
                    "clip_fraction", "entropy"):
            assert r[key] == pytest.approx(single[key], rel=1e-5), key
        for name in ("policy", "critic"):
            assert r["digest"][name] == pytest.approx(single["digest"][name], rel=1e-6)
        assert r["second_loss"][0] == pytest.approx(r["second_loss"][1], abs=1e-7)
        assert r["reloaded_digest"] == pytest.approx(r["after_digest"], rel=1e-12)
