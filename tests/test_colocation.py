"""Colocated trainer + SGLang: the order in which memory changes hands (engine release and
resume tags, Megatron's gradient buffers freed while the engine generates) on a real
megatron-core model on CPU, an update after a full offload/restore cycle equal to one
without it, and released engine weights never resumed without a push (a warm-up step keeps
them; a rollout from released weights is refused)."""

from __future__ import annotations

import pytest
import torch

from megatron_sppo.config import ModelConfig
from megatron_sppo.trainer.colocation import CACHES, WEIGHTS, Colocation


class RecordingEngine:
    """Records the memory calls the SGLang engine would turn into HTTP requests (their
    protocol is tested against the stand-in server in test_rollout_sglang.py)."""

    def __init__(self):
        self.calls = []

    def release_memory(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory(self, tags=None):
        self.calls.append(("resume", tags))


def _grad_storage(model) -> list[int]:
    return [b.grad_data.storage().size() for b in model.ddp.buffers]


def _model(hf_dir):
    from megatron_sppo.trainer.models import build_trained_model

    return build_trained_model("policy", ModelConfig(checkpoint=str(hf_dir), lr=1e-3), str(hf_dir),
                               total_steps=2)


def _update(model, tokenizer) -> float:
    from megatron_sppo.trainer.sft import sft_step, tokenize_sft

    pairs = tokenize_sft([{"prompt": "1+2=?", "response": "\\boxed{3}"},
                          {"prompt": "4-1=?", "response": "4-1=3\n\\boxed{3}"}], tokenizer)
    return sft_step(model, pairs, max_tokens=256)


def test_memory_changes_hands_in_order_and_training_is_unchanged(zoo, megatron_tp1):
    from transformers import AutoTokenizer

    hf = zoo["qwen2_gqa_untied"]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    torch.manual_seed(0)
    cycled, plain = _model(hf), _model(hf)
    engine = RecordingEngine()
    col = Colocation(engine, [cycled], enabled=True, release_engine=True)
    col.release(WEIGHTS + CACHES)  # at start-up, before Megatron allocates
    col.before_sync()  # the first sync: weights back, pushed
    col.for_rollout()
    assert all(size == 0 for size in _grad_storage(cycled))  # freed while generating
    assert engine.calls == [("release", ["weights", "kv_cache", "cuda_graph"]),
                            ("resume", ["weights"]), ("resume", ["kv_cache", "cuda_graph"])]
    col.for_training(release_weights=False)  # a critic warm-up step: no sync follows
    assert all(size > 0 for size in _grad_storage(cycled))
    col.for_rollout()
    assert engine.calls[3:] == [("release", ["kv_cache", "cuda_graph"]),
                                ("resume", ["kv_cache", "cuda_graph"])]
    col.for_training()
    loss_cycled = _update(cycled, tokenizer)
    with pytest.raises(RuntimeError, match="generate from garbage"):
        col.for_rollout()  # released weights that no sync brought back
    col.before_sync()
    col.for_rollout()
    assert engine.calls[5:] == [("release", ["kv_cache", "cuda_graph", "weights"]),
                                ("resume", ["weights"]), ("resume", ["kv_cache", "cuda_graph"])]
    assert all(size == 0 for size in _grad_storage(cycled))
    col.for_rollout()  # already there: nothing happens twice
    assert len(engine.calls) == 8

    loss_plain = _update(plain, tokenizer)
    assert loss_cycled == loss_plain
    for a, b in zip(cycled.module.parameters(), plain.module.parameters()):
        assert torch.equal(a, b)

    idle = RecordingEngine()
    off = Colocation(idle, [plain], enabled=False, release_engine=True)
    off.release(WEIGHTS), off.for_rollout(), off.for_training(), off.before_sync()
    assert idle.calls == [] and all(size > 0 for size in _grad_storage(plain))
