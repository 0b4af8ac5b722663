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


def test_entropy_without_autograd_when_it_is_only_a_metric(megatron_tp1):
    """entropy_coef = 0 (``entropy_grad=False``, as policy_forward_backward passes then): the
    loss and the logits' gradient are those of the graph-building path, bit for bit, the
    entropy is the same number, and autograd keeps for the backward pass exactly what the
    log-probs alone keep: no [tokens x vocabulary] entropy intermediates. With an entropy
    bonus the gradient path is still there."""
    import torch

    from megatron_sppo.algorithms import PolicyLossConfig, policy_loss
    from megatron_sppo.models.logprobs import token_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    logits0 = torch.randn(2, 6, 64, generator=g)  # 64 padded ids, 60 real ones
    targets = torch.randint(0, 60, (2, 6), generator=g)
    old, adv = -3 + torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)

    def step(with_entropy: bool, entropy_grad: bool, coef: float = 0.0):
        logits, saved = logits0.clone().requires_grad_(), []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logprobs, entropy = token_logprobs_and_entropy(
                logits, targets, vocab_size=60, temperature=0.7, with_entropy=with_entropy,
                entropy_grad=entropy_grad)
            out = policy_loss(logprobs, old, adv, mask, PolicyLossConfig(entropy_coef=coef),
                              entropy=entropy)
        out.loss.backward()
        return out.loss.detach(), logits.grad, entropy, sum(saved)

    loss_graph, grad_graph, ent_graph, saved_graph = step(True, True)
    loss_free, grad_free, ent_free, saved_free = step(True, False)
    _, grad_none, _, saved_none = step(False, False)
    assert torch.equal(loss_graph, loss_free) and torch.equal(grad_graph, grad_free)
    assert torch.equal(grad_free, grad_none)
    assert torch.equal(ent_graph.detach(), ent_free) and ent_free.grad_fn is None
    assert saved_free == saved_none < saved_graph
    _, grad_bonus, _, _ = step(True, True, coef=0.1)
    assert not torch.allclose(grad_bonus, grad_graph)
