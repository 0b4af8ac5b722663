"""Critic values (GPTModel + scalar head, built from an HF checkpoint) at the launched TP/PP
vs a plain-PyTorch reference: HF's final hidden states @ w + b.

Usage: torchrun --nproc-per-node N check_critic.py HF_DIR --tp T --pp P
"""

import argparse

import torch
from common import forward_logits, report, sample_batch

from megatron_sppo.checkpoint.convert import model_from_hf
from megatron_sppo.models.critic import logits_at
from megatron_sppo.runtime import init_distributed

BIAS = 0.3


def head_weight(hidden: int) -> torch.Tensor:
    return torch.randn(1, hidden, generator=torch.Generator().manual_seed(1)) * 0.1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    init_distributed(args.tp, args.pp)
    arch, _, model = model_from_hf(args.hf_dir, tp=args.tp, pp=args.pp, critic=True)
    if model.post_process:
        head = model.output_layer
        initial = torch.sigmoid(head.bias).item() if not head.weight.any() else None
        with torch.no_grad():
            head.weight.copy_(head_weight(arch.hidden_size))
            head.bias.fill_(BIAS)
    ids = sample_batch(arch.vocab_size, batch=3, seq=9)
    with torch.no_grad():
        values = forward_logits(model, ids, vocab_parallel=False)
    if values is None:
        return
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    with torch.no_grad():
        hidden = hf.model(ids).last_hidden_state
    reference = hidden @ head_weight(arch.hidden_size).T + BIAS
    prompt_lengths = torch.tensor([9, 5, 2])
    report({"rank": torch.distributed.get_rank(), "shape": list(values.shape),
            "max_diff": (values - reference).abs().max().item(),
            "at_diff": (logits_at(values, prompt_lengths - 1)
                        - reference[torch.arange(3), prompt_lengths - 1, 0]).abs().max().item(),
            "initial_value": initial,
            "head_params": sorted(n for n, _ in model.named_parameters()
                                  if n.startswith("output_layer."))})


if __name__ == "__main__":
    main()
