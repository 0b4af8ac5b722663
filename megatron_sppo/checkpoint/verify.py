"""Check a Megatron checkpoint against an HF model: the same tokens must give the same logits.

Runs in one process at TP=1/PP=1 (dist_checkpointing reshards any saved layout on load) and
compares over the real vocabulary, with the padded rows required to be unused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_sppo.checkpoint.megatron_io import describe_checkpoint, load_model_checkpoint


def compare_logits(megatron_path: str | Path, hf_path: str | Path, seq_len: int = 32,
                   batch: int = 2, seed: int = 0) -> dict:
    """Max |logits_megatron - logits_hf| in fp32 on random tokens; also the HF model's scale."""
    import transformers
    from megatron.core import parallel_state

    from megatron_sppo.models.builder import build_gpt_model, transformer_config
    from megatron_sppo.models.inputs import causal_inputs
    from megatron_sppo.runtime import enable_cpu_megatron, init_distributed

    enable_cpu_megatron(force=True)  # compared with transformers on the host, in fp32
    info = describe_checkpoint(megatron_path)
    iter_dir, arch = info.iter_dir, info.arch
    init_distributed(1, 1)
    model = build_gpt_model(arch, transformer_config(arch, params_dtype=torch.float32,
                                                     perform_initialization=False))
    load_model_checkpoint(model, iter_dir)
    ids = torch.randint(0, arch.vocab_size, (batch, seq_len),
                        generator=torch.Generator().manual_seed(seed))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    with torch.no_grad():
        ours = model(ids, *causal_inputs(ids))
        ref = hf.eval()(ids).logits
    parallel_state.destroy_model_parallel()
    return {"max_abs_diff": (ours[..., : arch.vocab_size] - ref).abs().max().item(),
            "max_abs_logit": ref.abs().max().item(),
            "padded_vocab_unused": bool((ours[..., arch.vocab_size:] == 0).all()),
            "tokens": batch * seq_len}
