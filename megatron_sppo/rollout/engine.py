"""The rollout engine interface shared by the trainer and evaluation.

An engine turns prompt token ids into sampled responses with the per-token log-probs the
sampler used (``log_softmax(logits / temperature)``, SGLang's definition), and accepts new
weights from the Megatron policy. Two implementations: the in-process local engine
(transformers; CPU and debugging) and the SGLang engine (production). The trainer never
imports either directly; it asks :func:`megatron_sppo.rollout.build_engine` for one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


class EngineError(RuntimeError):
    """The engine cannot serve: a server died and could not be restarted, or it refused a
    request. The message names the server and what to check."""


@dataclass(frozen=True)
class SamplingParams:
    """What one ``generate`` call samples with. ``temperature == 0`` means greedy.

    ``seed`` makes a call reproducible: sample ``j`` of prompt ``i`` is drawn from its own
    stream seeded with :func:`sample_seed` (``seed``, ``i``, ``j``), so it does not depend on
    how the engine batches the call.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None


@dataclass
class Sample:
    """One response: its tokens, the engine's log-prob of each, and why it ended.

    ``finish_reason`` is ``"stop"`` (EOS or a stop string/id; the ending token is included),
    ``"length"`` (cut at ``max_new_tokens``) or ``"abort"`` (cut short by the engine, e.g. a
    straggler aborted at a deadline). The trainer's truncation policy applies to the last two.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason in ("length", "abort")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 63-bit seed of one sample's stream; well mixed, so consecutive call seeds (e.g.
    the trainer step) never share a stream."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


@dataclass
class WeightVersion:
    """Which policy weights produced a rollout (trainer step of the last sync)."""

    version: int = 0
    names: list[str] = field(default_factory=list)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, returned as ``result[prompt_index][sample_index]``."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the engine's weights (HF names, full unsharded tensors) and record ``version``."""

    @property
    def weight_version(self) -> int: ...

    def release_memory(self) -> None:
        """Free GPU memory for training (colocated placement); a no-op where meaningless."""

    def resume_memory(self) -> None: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...
