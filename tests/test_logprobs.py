"""Per-token log-probs and entropy from vocab-parallel logits equal a single-process
full-vocabulary log_softmax (values and gradients), padded ids excluded, at TP=1 and TP=2."""

import pytest
from helpers import torchrun


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_logprobs_and_entropy(tp):
    results = torchrun("check_logprobs.py", tp)
    assert len(results) == tp
    for r in results:
        assert r["logprob_diff"] < 1e-5 and r["entropy_diff"] < 1e-5, r
        assert r["grad_diff"] < 1e-5, r
        assert r["padded_grad_zero"] and r["finite"], r
