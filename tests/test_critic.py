"""The critic (GPTModel + scalar head from an HF checkpoint) gives HF's final hidden states
@ w + b at TP=1, TP=2 and PP=2; the new zero-initialised head starts at V = 0.5."""

import pytest
from helpers import torchrun


@pytest.mark.parametrize("nproc,layout", [(1, ()), (2, ("--tp", "2")), (2, ("--pp", "2"))],
                         ids=["tp1", "tp2", "pp2"])
def test_critic_values_match_reference(zoo, nproc, layout):
    results = torchrun("check_critic.py", nproc, zoo["qwen2_gqa_untied"], *layout)
    assert results
    for r in results:
        assert r["shape"] == [3, 9, 1]
        assert r["max_diff"] < 1e-5 and r["at_diff"] < 1e-5, r
        assert r["initial_value"] == 0.5  # zero-initialised head
        assert r["head_params"] == ["output_layer.bias", "output_layer.weight"]
