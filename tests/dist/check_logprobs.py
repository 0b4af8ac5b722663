"""Vocab-parallel log-probs and entropy (values and gradients) vs a single-process
full-vocabulary computation. Usage: torchrun --nproc-per-node TP check_logprobs.py"""

import os

import torch
from common import report

from megatron_sppo.models.logprobs import token_logprobs_and_entropy
from megatron_sppo.runtime import init_distributed


def reference(logits, targets, vocab, temperature):
    logp = torch.log_softmax(logits[..., :vocab].double() / temperature, dim=-1)
    taken = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return taken, entropy


def main():
    from megatron.core import parallel_state

    init_distributed(int(os.environ.get("WORLD_SIZE", "1")), 1)  # every rank is a TP rank
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    vocab, padded, temperature = 13, 16, 0.7
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(3, 5, padded, generator=g) * 3).double()
    full[..., vocab:] = 0.0  # padded rows of the output layer are zero
    targets = torch.randint(0, vocab, (3, 5), generator=g)
    w_lp, w_ent = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)

    shard = full.chunk(tp, dim=-1)[rank].float().clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(shard, targets, vocab_size=vocab,
                                         temperature=temperature)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    grads = [torch.empty_like(shard.grad) for _ in range(tp)]
    torch.distributed.all_gather(grads, shard.grad)
    grad = torch.cat(grads, dim=-1)

    ref_full = full.clone().requires_grad_(True)
    ref_lp, ref_ent = reference(ref_full, targets, vocab, temperature)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()
    report({"rank": rank, "tp": tp,
            "logprob_diff": (lp.double() - ref_lp).abs().max().item(),
            "entropy_diff": (ent.double() - ref_ent).abs().max().item(),
            "grad_diff": (grad.double() - ref_full.grad).abs().max().item(),
            "padded_grad_zero": bool((grad[..., vocab:] == 0).all()),
            "finite": bool(torch.isfinite(grad).all())})


if __name__ == "__main__":
    main()
