"""Log-probs of the taken tokens and the policy's entropy, from vocab-parallel logits.

Under tensor parallelism every rank holds logits for its slice of the (padded) vocabulary.
Both quantities are computed with all-reduces of per-rank partial results (max, sum-exp,
sum of p*z), never gathering the full vocabulary on one rank. The logits are divided by the
sampling temperature first, because that is what the rollout engine samples from and
reports (SGLang returns log_softmax(logits / T)), and padded vocabulary ids are masked out
(sliced off when one rank holds the whole vocabulary: a small vocabulary padded to 1024 ids
would otherwise spend most of the softmax on padding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sppo.models.vocab import mask_padded_logits


def _vocab_parallel_entropy(logits: torch.Tensor, group) -> torch.Tensor:
    """H = log S - sum(e*z)/S with z = logits - max, e = exp(z), S = sum(e), over all ranks."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    shift = logits.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    z = logits - shift
    e = z.exp()
    # masked ids have z = -inf and e = 0: zero z there so that neither e*z nor its
    # gradient becomes 0 * inf = nan
    z_finite = z.masked_fill(torch.isinf(z), 0.0)
    sum_e = reduce_from_tensor_model_parallel_region(e.sum(-1), group)
    sum_ez = reduce_from_tensor_model_parallel_region((e * z_finite).sum(-1), group)
    return sum_e.log() - sum_ez / sum_e


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                               temperature: float = 1.0, with_entropy: bool = True,
                               entropy_grad: bool = True,
                               tp_group=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) and entropy per position, in fp32, differentiable w.r.t. ``logits``.

    logits: [..., V_padded / tp] this rank's vocabulary shard; targets: [...] token ids
    (already aligned: the logits at position t scored against the token at t+1);
    vocab_size: the real vocabulary (ids >= it are padding). ``entropy_grad=False`` computes
    the entropy without autograd (a metric only, when the loss has no entropy term): its
    [tokens x vocabulary / tp] fp32 intermediates are freed at once instead of being kept
    for the backward pass (about 3 GB each at 10,240 tokens of a 152k vocabulary, TP=2).
    """
    from megatron.core import parallel_state, tensor_parallel

    group = tp_group or parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:  # one shard: drop the padded ids instead of masking
        scaled = logits[..., :vocab_size].float() / temperature
    else:
        scaled = mask_padded_logits(logits.float() / temperature, vocab_size,
                                    dist.get_rank(group))
    # Entropy first: vocab_parallel_cross_entropy overwrites its fp32 input in place.
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = _vocab_parallel_entropy(scaled, group)
    logprobs = -tensor_parallel.vocab_parallel_cross_entropy(scaled, targets, tp_group=group)
    return logprobs, entropy
