"""Next-token sampling and returned log-probs as SGLang 0.5.23 computes them with its
pytorch sampling backend (sglang/srt/layers/sampler.py, sampling/sampling_params.py,
sampling/sampling_batch_info.py), one batch of rows at a time:

* sampling params are normalised first: temperature below 1e-6 becomes temperature 1 with
  top_k 1 (greedy), top_k -1 becomes "the whole vocabulary" (1 << 30);
* a batch whose rows all have top_k <= 1 takes the argmax, log-probs log_softmax(logits);
* otherwise logits are divided by the temperature, probs = softmax, and the returned log-probs
  are log(probs) (log_softmax under --enable-deterministic-inference), taken over the whole
  vocabulary BEFORE top-k / top-p / min-p filtering; the token is drawn from the filtered
  probs (sorted descending: ranks >= top_k zeroed, then tokens whose preceding mass exceeds
  top_p, then probs below min_p x the largest);
* without --enable-deterministic-inference ``sampling_seed`` is ignored (the server's own RNG
  draws); with it every row draws with the Gumbel trick from noise that depends only on
  (seed, position, token id), rows without a seed using 42, and min_p is refused as SGLang
  asserts. The noise here is a hash of our own, not SGLang's murmur kernel: the property the
  trainer relies on, a token fixed by its seed and position whatever the batch, is the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

TOP_K_ALL = 1 << 30
SAMPLING_EPS = 1e-6
DEFAULT_SEED = 42  # sampling_batch_info.py: rows without a seed under deterministic inference


@dataclass
class Params:
    """A request's sampling params after SGLang's normalisation (SamplingParams.__post_init__)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    sampling_seed: int | None = None

    def __post_init__(self):
        if 0 <= self.temperature < SAMPLING_EPS:
            self.temperature, self.top_k = 1.0, 1
        if self.top_k == -1:
            self.top_k = TOP_K_ALL


def check_params(p: dict, vocab_size: int) -> str | None:
    """SamplingParams.verify: the message of the first invalid field, None if all are valid."""
    t, top_p, top_k = p.get("temperature", 1.0), p.get("top_p", 1.0), p.get("top_k", -1)
    if t is not None and t < 0:
        return f"temperature must be a non-negative finite number, got {t}."
    if top_p is not None and not 0.0 < top_p <= 1.0:
        return f"top_p must be in (0, 1], got {top_p}."
    if top_k is not None and top_k < 1 and top_k != -1:
        return f"top_k must be -1 (disable) or at least 1, got {top_k}."
    min_p = p.get("min_p") or 0.0
    if not 0.0 <= min_p <= 1.0:
        return f"min_p must be in [0, 1], got {min_p}."
    seed = p.get("sampling_seed")
    if seed is not None and not isinstance(seed, int):
        return f"sampling_seed must be an integer, got {type(seed).__name__}."
    if (p.get("max_new_tokens") or 0) < 0:
        return f"max_new_tokens must be at least 0, got {p['max_new_tokens']}."
    return None


def _gumbel(seed: int, position: int, size: int) -> torch.Tensor:
    """float64 Gumbel noise over the vocabulary, a function of (seed, position) only."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    u = torch.rand(size, generator=g, dtype=torch.float64).clamp_(min=2.0 ** -53)
    return -torch.log(-torch.log(u).clamp_(max=-(2.0 ** -32)))


def _seeded_choice(logprobs: torch.Tensor, seeds: list[int], positions: list[int]) -> torch.Tensor:
    noise = torch.stack([_gumbel(s, p, logprobs.shape[-1]) for s, p in zip(seeds, positions)])
    return (logprobs.double() + noise).argmax(-1)


def _filtered(probs: torch.Tensor, params: list[Params], need_min_p: bool):
    """top_k_top_p_min_p_sampling_from_probs_torch: sorted kept probs and their token ids."""
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    top_ks = torch.tensor([p.top_k for p in params])
    top_ps = torch.tensor([p.top_p for p in params], dtype=probs.dtype)
    mass_before = probs_sort.cumsum(-1) - probs_sort
    probs_sort[torch.arange(probs.shape[-1])[None, :] >= top_ks[:, None]] = 0.0
    probs_sort[mass_before > top_ps[:, None]] = 0.0
    if need_min_p:
        min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype)
        probs_sort[probs_sort < (probs_sort[:, 0] * min_ps)[:, None]] = 0.0
    return probs_sort, probs_idx


def sample(logits: torch.Tensor, params: list[Params], positions: list[int], *,
           deterministic: bool, generator: torch.Generator) -> tuple[list[int], list[float]]:
    """Tokens and their returned log-probs for fp32 host logits [B, V] (one row per request;
    ``positions``: each row's position, for seeded draws)."""
    if all(p.top_k <= 1 for p in params):
        tokens = logits.argmax(-1)
        logprobs = torch.log_softmax(logits, -1)
    else:
        logits = logits / torch.tensor([p.temperature for p in params])[:, None]
        probs = torch.softmax(logits, -1)
        logprobs = torch.log_softmax(logits, -1) if deterministic else torch.log(probs)
        need_min_p = any(p.min_p > 0 for p in params)
        seeds = [DEFAULT_SEED if p.sampling_seed is None else p.sampling_seed for p in params]
        if deterministic and need_min_p:
            raise AssertionError("With sampling seed, multinomial_with_seed will provide wrong "
                                 "results")
        if any(p.top_p != 1.0 or p.top_k != TOP_K_ALL for p in params) or need_min_p:
            kept, ids = _filtered(probs, params, need_min_p)
            index = (_seeded_choice(kept.log(), seeds, positions) if deterministic else
                     torch.multinomial(kept, 1, generator=generator).squeeze(-1))
            tokens = ids.gather(-1, index[:, None]).squeeze(-1)
        elif deterministic:
            tokens = _seeded_choice(probs.log(), seeds, positions)
        else:  # SGLANG_OPT_USE_GUMBEL_SAMPLE (default on): probs / Exp(1) noise, argmax
            noise = torch.empty_like(probs).exponential_(generator=generator)
            tokens = (probs / noise.clamp_(min=torch.finfo(probs.dtype).tiny)).argmax(-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens.tolist(), chosen.tolist()
