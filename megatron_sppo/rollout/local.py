"""The in-process rollout engine: a transformers model sampled with a KV cache.

It is the embedded default (CPU runs, tests, debugging). Its weights come from the Megatron
policy through the same exporter SGLang's weight sync uses, so a mapping bug shows up here
first. The sampling loop is our own rather than ``generate`` because the trainer needs
exactly SGLang's log-prob definition and finish semantics:

* log-probs are ``log_softmax(logits / temperature)`` of the sampled token over the whole
  vocabulary, taken BEFORE top-k/top-p filtering (SGLang 0.5.23, sglang/srt/layers/sampler.py:
  ``logits.div_(temperatures)``, ``probs = softmax``, ``logprobs = log(probs)``, then the
  top-k/top-p sampler works on a filtered copy). Greedy (temperature 0) is argmax with the
  log-probs of the unscaled logits (SGLang turns temperature 0 into temperature 1, top_k 1).
* top-k / top-p filter like SGLang's torch sampler: sort descending, zero ranks >= k and
  tokens whose preceding cumulative mass already exceeds p, sample from what is left.
* the response includes the token that ended it (EOS, a stop id, or the token completing a
  stop string); stop strings are searched in the decoded last ``max stop tokens + 1``
  tokens; ``text`` is cut before a matched stop string and drops special tokens.
* ``n`` samples per prompt: the prompt is prefilled once and its cache repeated ``n`` times.

Seeded calls are reproducible: every sample draws from its own generator seeded with
:func:`~megatron_sppo.rollout.engine.sample_seed`, so its tokens do not depend on the batch
it was decoded in (up to float rounding of the logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import Sample, SamplingParams, sample_seed


def filter_top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(unnormalised kept probabilities sorted descending, their token ids) as SGLang keeps
    them: ranks >= ``top_k`` (when > 0) and tokens after the first ``top_p`` mass are zeroed."""
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    if top_k > 0:
        probs_sort[..., top_k:] = 0.0
    if top_p < 1.0:
        mass_before = probs_sort.cumsum(dim=-1) - probs_sort
        probs_sort[mass_before > top_p] = 0.0
    return probs_sort, probs_idx


def _draw(weights: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One index per row with probability proportional to ``weights`` [B, V] (>= 0), row b
    drawing from ``generators[b]`` (the global RNG when None).

    The exponential race ``argmax(w / E)``, E ~ Exp(1) i.i.d., is exact and several times
    faster on CPU than ``torch.multinomial`` for a batch of rows. E is kept above 0 so that a
    zero weight never wins through 0/0.
    """
    if generators is None:
        noise = torch.empty_like(weights).exponential_()
    else:
        noise = torch.stack([weights.new_empty(weights.shape[-1]).exponential_(generator=g)
                             for g in generators])
    return (weights / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] (SGLang's definition) from fp32 logits [B, V];
    ``generators``: one per row, or None for the global RNG."""
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
        probs = logprobs.exp()
        if params.top_k > 0 or params.top_p < 1.0:
            kept, ids = filter_top_k_top_p(probs, params.top_k, params.top_p)
            tokens = ids.gather(-1, _draw(kept, generators)[:, None]).squeeze(-1)
        else:
            tokens = _draw(probs, generators)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _preallocated_cache(num_layers: int, capacity: int):
    """A transformers cache whose layers write into buffers sized for the whole generation.

    transformers' DynamicLayer re-concatenates the whole cache at every decode step (an
    O(length^2) copy that dominated CPU decoding); these layers write one position and
    return views, with the same batch selection / repetition the sampling loop needs.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device = key_states.dtype, key_states.device
                batch, heads, _, _ = key_states.shape
                self._k = key_states.new_empty(batch, heads, capacity, key_states.shape[-1])
                self._v = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
                self.length = 0
                self.is_initialized = True
            new = key_states.shape[-2]
            self._k[:, :, self.length:self.length + new] = key_states
            self._v[:, :, self.length:self.length + new] = value_states
            self.length += new
            self._views()
            return self.keys, self.values

        def _views(self):
            self.keys = self._k[:, :, :self.length]
            self.values = self._v[:, :, :self.length]

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    return Cache(layers=[PreallocatedLayer() for _ in range(num_layers)])


def _eos_ids(hf_path: Path, config) -> set[int]:
    from transformers import GenerationConfig

    eos = None
    if (hf_path / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(hf_path).eos_token_id
    if eos is None:
        eos = config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


class LocalEngine:
    """:class:`~megatron_sppo.rollout.engine.RolloutEngine` over a transformers model.

    Built from the HF config in ``hf_path``; its weights stay unset until
    :meth:`update_weights` (the policy's exported tensors) unless ``load_weights`` reads the
    checkpoint there (evaluation, debugging). ``max_batch_size`` bounds the sequences
    decoded together (memory); ``dtype`` defaults to float32 so that log-probs match the
    trainer's fp32 recomputation.
    """

    def __init__(self, hf_path: str | Path, *, load_weights: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_batch_size: int = 256):
        import transformers

        hf_path = Path(hf_path)
        if not (hf_path / "config.json").is_file():
            raise UserError(f"{hf_path}/config.json not found: the local engine needs the "
                            "policy's HF config directory")
        config = transformers.AutoConfig.from_pretrained(hf_path)
        self.device = torch.device(device)
        if load_weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._params = dict(self.model.named_parameters())  # tied heads appear once
        self._unset = set() if load_weights else set(self._params)
        self._version = 0
        self.eos_token_ids = _eos_ids(hf_path, config)
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.vocab_size = config.vocab_size
        self.max_batch_size = max_batch_size
        self.tokenizer = (transformers.AutoTokenizer.from_pretrained(hf_path)
                          if any((hf_path / f).is_file() for f in
                                 ("tokenizer.json", "tokenizer_config.json")) else None)

    # ---- weights -------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: int) -> None:
        """Copy HF-named full tensors into the model (any subset; all of them before the
        first ``generate``) and record ``version``."""
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = self._params.get(name)
                if param is None:
                    raise ValueError(f"the local engine's model has no weight named {name!r}")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: got shape {list(tensor.shape)}, the model "
                                     f"has {list(param.shape)}")
                param.copy_(tensor)
                self._unset.discard(name)
        self._version = version

    @property
    def weight_version(self) -> int:
        return self._version

    # ---- generation ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        self._check(prompts, params)
        n = params.n
        generators = None
        if params.seed is not None:
            generators = [torch.Generator(self.device).manual_seed(sample_seed(params.seed, i, j))
                          for i in range(len(prompts)) for j in range(n)]
        per_chunk = max(1, self.max_batch_size // n)
        samples: list[Sample] = []
        for start in range(0, len(prompts), per_chunk):
            chunk_generators = (None if generators is None
                                else generators[start * n:(start + per_chunk) * n])
            samples += self._generate_chunk(prompts[start:start + per_chunk], params,
                                            chunk_generators)
        return [samples[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if self._unset:
            raise RuntimeError(f"the local engine has {len(self._unset)} weights never set "
                               f"(e.g. {sorted(self._unset)[0]}): call update_weights with "
                               "the policy's exported tensors first")
        if params.n < 1 or params.max_new_tokens < 1:
            raise UserError(f"n={params.n} and max_new_tokens={params.max_new_tokens} must "
                            "both be >= 1")
        if params.temperature < 0:
            raise UserError(f"temperature={params.temperature} must be >= 0")
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer: put the tokenizer files next to "
                            "config.json or use stop_token_ids")
        for i, prompt in enumerate(prompts):
            if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab_size:
                raise UserError(f"prompt {i} is empty or has token ids outside "
                                f"[0, {self.vocab_size})")

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams,
                        generators: list[torch.Generator] | None) -> list[Sample]:
        n, dev = params.n, self.device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: last prompt tokens aligned
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _preallocated_cache(self.model.config.num_hidden_layers,
                                    width + params.max_new_tokens)
        logits = self._forward(ids, mask, positions, cache)
        if n > 1:  # one prefill per prompt, its cache shared by the n samples
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            positions = positions.repeat_interleave(n, 0)
        next_pos = positions[:, -1:] + 1
        rows, steps = len(prompts) * n, params.max_new_tokens
        stop_ids = torch.tensor(sorted(self.eos_token_ids | set(params.stop_token_ids)),
                                dtype=torch.long, device=dev)
        out_tokens = torch.zeros((rows, steps), dtype=torch.long, device=dev)
        out_logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=dev)
        lengths = torch.zeros(rows, dtype=torch.long, device=dev)
        stopped_samples = torch.zeros(rows, dtype=torch.bool, device=dev)
        matched: dict[int, str] = {}
        active = torch.arange(rows, device=dev)  # batch row -> sample index
        done = torch.zeros(rows, dtype=torch.bool, device=dev)  # per batch row
        stop_window = self._stop_window(params.stop)
        for step in range(steps):
            row_generators = (None if generators is None
                              else [generators[i] for i in active.tolist()])
            next_tokens, next_logprobs = sample_next(logits, params, row_generators)
            live = ~done
            samples = active[live]
            out_tokens[samples, step] = next_tokens[live]
            out_logprobs[samples, step] = next_logprobs[live]
            lengths[samples] += 1
            stopped = torch.isin(next_tokens, stop_ids) & live
            if stop_window:
                for row in (live & ~stopped).nonzero().flatten().tolist():
                    sample = int(active[row])
                    tail = out_tokens[sample, max(0, step + 1 - stop_window):step + 1]
                    hit = self._match_stop(tail.tolist(), params.stop)
                    if hit is not None:
                        matched[sample] = hit
                        stopped[row] = True
            stopped_samples[active[stopped]] = True
            done |= stopped
            if step == steps - 1 or bool(done.all()):
                break
            if 8 * int(done.sum()) >= len(active):  # drop finished rows from the batch
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                active, mask, next_pos = active[keep], mask[keep], next_pos[keep]
                next_tokens, done = next_tokens[keep], done[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = self._forward(next_tokens[:, None], mask, next_pos, cache)
            next_pos = next_pos + 1
        out = []
        for i, (length, stop) in enumerate(zip(lengths.tolist(), stopped_samples.tolist())):
            token_ids = out_tokens[i, :length].tolist()
            out.append(Sample(token_ids=token_ids, logprobs=out_logprobs[i, :length].tolist(),
                              finish_reason="stop" if stop else "length",
                              text=self._text(token_ids, matched.get(i))))
        return out

    def _stop_window(self, stop: tuple[str, ...]) -> int:
        """How many trailing tokens to decode to see any stop string (SGLang's rule)."""
        if not stop:
            return 0
        return 1 + max(len(self.tokenizer.encode(s, add_special_tokens=False)) for s in stop)

    def _match_stop(self, tail_tokens: list[int], stop: tuple[str, ...]) -> str | None:
        tail = self.tokenizer.decode(tail_tokens)
        return next((s for s in stop if s and s in tail), None)

    def _text(self, tokens: list[int], matched: str | None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if matched is not None and matched in text:
            text = text[:text.index(matched)]
        return text

    # ---- lifecycle (nothing to do in process) -----------------------------------------------

    def release_memory(self) -> None:
        """Nothing to free: the local engine shares the host with the trainer."""

    def resume_memory(self) -> None:
        """Nothing was freed."""

    def health(self) -> bool:
        return self.model is not None

    def shutdown(self) -> None:
        self.model = None
        self._params = {}
