"""SPPO critic updates in megatron-core: identical at TP=1, TP=2, PP=2 and DP=2 (losses, grad
norms, values of the updated critic), and the critic learns prompt solvability that depends
on the prompt's content (held-out ROC AUC >= 0.8, BCE falls)."""

import pytest
from helpers import torchrun

LAYOUTS = {"tp2": (2, ("--tp", "2")), "pp2": (2, ("--pp", "2")), "dp2": (2, ())}


@pytest.fixture(scope="module")
def baseline(zoo):
    (result,) = torchrun("critic_step.py", 1, zoo["qwen2_gqa_untied"], "--steps", "2")
    return result


@pytest.mark.parametrize("layout", LAYOUTS)
def test_critic_update_is_layout_independent(zoo, baseline, layout):
    nproc, flags = LAYOUTS[layout]
    results = torchrun("critic_step.py", nproc, zoo["qwen2_gqa_untied"], "--steps", "2", *flags)
    assert results
    assert baseline["values_before"] == [0.0] * 4  # zero-initialised head: V = 0.5
    for r in results:
        assert r["first_loss"] == pytest.approx(baseline["first_loss"], abs=1e-6)
        assert r["last_loss"] == pytest.approx(baseline["last_loss"], abs=1e-6)
        assert r["grad_norm"] == pytest.approx(baseline["grad_norm"], rel=1e-5)
        assert r["values_after"] == pytest.approx(baseline["values_after"], abs=1e-5)
    assert baseline["values_after"] != pytest.approx([0.0] * 32, abs=1e-4), "critic must move"


def test_critic_learns_content_dependent_solvability(zoo):
    (r,) = torchrun("critic_step.py", 1, zoo["qwen2_gqa_untied"], "--task", "compare",
                    "--steps", "150")
    assert r["heldout_bce_before"] == pytest.approx(0.6931, abs=1e-3)
    assert r["heldout_bce_after"] < 0.5, r
    assert r["heldout_auc"] >= 0.8, r
