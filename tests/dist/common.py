"""Helpers shared by the scripts that tests launch under torchrun (gloo, CPU)."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_sppo.models.inputs import causal_inputs  # noqa: E402,F401  (re-exported)
from megatron_sppo.runtime import enable_cpu_megatron  # noqa: E402

enable_cpu_megatron()


def _leave_together() -> None:
    """Destroy the process groups before interpreter exit, as train/sft do: gloo pairs torn
    down by static destructors can abort a rank ("terminate called without an active
    exception"). Skipped after an uncaught exception, whose peers may never reach a barrier."""
    if getattr(sys, "last_exc", None) is None and getattr(sys, "last_value", None) is None:
        from megatron_sppo.runtime.distributed import shutdown_distributed

        shutdown_distributed()


atexit.register(_leave_together)


def sample_batch(vocab_size: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[.., V/tp] shards of the TP group -> [.., V]."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def forward_logits(model, ids: torch.Tensor, vocab_parallel: bool = True) -> torch.Tensor | None:
    """Full-vocabulary logits (or a critic's [b, s, 1] values when ``vocab_parallel`` is
    False) through megatron's pipeline schedule, forward only.

    Returns the logits on the last pipeline stage, None elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected = []

    def step(data_iterator, model_chunk):
        batch = next(data_iterator)
        pos, mask = causal_inputs(batch)
        out = model_chunk(batch, pos, mask)

        def loss_func(output):
            collected.append(gather_vocab(output) if vocab_parallel else output)
            return output.sum() * 0.0, {}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True)
    return collected[0] if collected else None


def hf_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def report(obj) -> None:
    """Print one RESULT line (the tests parse it) from the rank that holds the output."""
    sys.stdout.flush()  # one write() per line: ranks share the pipe and must not interleave
    os.write(sys.stdout.fileno(), ("RESULT " + json.dumps(obj) + "\n").encode())
