"""Megatron logits vs HF transformers logits for HF models at the launched TP/PP.

Usage: torchrun --nproc-per-node N check_logits.py --tp T --pp P HF_DIR [HF_DIR ...]
       [--megatron DIR]   load the weights from this Megatron checkpoint instead of HF
Prints per model: max |megatron - hf| over the real vocabulary, and this rank's share of
the parameters.
"""

import argparse

import torch
from common import forward_logits, hf_logits, report, sample_batch

from megatron_sppo.checkpoint.convert import model_from_hf
from megatron_sppo.checkpoint.megatron_io import load_model_checkpoint, read_arch, resolve_checkpoint
from megatron_sppo.models import build_gpt_model, transformer_config
from megatron_sppo.runtime import init_distributed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dirs", nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--megatron")
    args = parser.parse_args()
    init_distributed(args.tp, args.pp)
    for hf_dir in args.hf_dirs:
        if args.megatron:
            iter_dir = resolve_checkpoint(args.megatron)
            arch = read_arch(iter_dir)
            model = build_gpt_model(arch, transformer_config(arch, tp=args.tp, pp=args.pp))
            load_model_checkpoint(model, iter_dir)
        else:
            arch, _, model = model_from_hf(hf_dir, tp=args.tp, pp=args.pp)
        local = sum(p.numel() for p in model.parameters())
        total = torch.tensor([local])
        torch.distributed.all_reduce(total)
        ids = sample_batch(arch.vocab_size)
        with torch.no_grad():
            logits = forward_logits(model, ids)
        if logits is not None:
            diff = (logits[..., : arch.vocab_size] - hf_logits(hf_dir, ids)).abs().max().item()
            padded_zero = bool((logits[..., arch.vocab_size:] == 0).all())
            report({"hf": hf_dir, "max_diff": diff, "padded_logits_zero": padded_zero,
                    "rank": torch.distributed.get_rank(), "local_params": local,
                    "total_params": int(total.item())})
        else:
            report({"hf": hf_dir, "rank": torch.distributed.get_rank(), "local_params": local,
                    "total_params": int(total.item())})


if __name__ == "__main__":
    main()
