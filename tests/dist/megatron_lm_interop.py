"""Megatron-LM's own training code (``megatron.training``, shipped in the megatron-core wheel)
loads a checkpoint, trains a few steps and saves, on CPU (gloo) under the CPU device layer.

Usage: torchrun --nproc-per-node N megatron_lm_interop.py --out DIR --steps K -- FLAGS...
FLAGS are Megatron-LM's command line (what pretrain_gpt.py would get). The script does what
Megatron-LM's ``pretrain_gpt.py`` (core_r0.19.0) does up to training: ``parse_and_validate_args``
(``--use-checkpoint-args`` reads the model arguments from the checkpoint),
``gpt_config_from_args`` + ``pretrain_cfg_container_from_args``, ``initialize_megatron``,
``setup_model_and_optimizer`` (GPTModel from the arguments, DDP, optimizer,
``load_checkpoint``); then ``train_step`` with pretrain_gpt's loss on random tokens and
``save_checkpoint`` (model, optimizer, scheduler, RNG) at iteration K. The data pipeline is
replaced by random tokens, and three steps that need a GPU or a Megatron-LM checkout are
stood in for where they happen (see the comments in :func:`main`).

Writes to --out: ids.pt (the probe tokens), logits_loaded.pt (full-vocabulary logits right
after loading), logits_trained.pt (after the K steps) and trained.safetensors (the trained
weights under HF names, every stage gathered), from the rank that holds them.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from common import forward_logits, report, sample_batch

from megatron_sppo.models.inputs import causal_inputs


def lm_loss(loss_mask, output_tensor):
    """pretrain_gpt.py's loss_func: summed token losses, token count, the 'lm loss' report."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                     num_tokens.view(1)])}


def forward_step(data_iterator, model):
    """pretrain_gpt.py's forward_step on a batch of random tokens (next-token labels)."""
    tokens, labels = next(data_iterator)
    position_ids, attention_mask = causal_inputs(tokens)
    loss_mask = torch.ones_like(tokens, dtype=torch.float)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(lm_loss, loss_mask)


def batches(vocab_size: int, micro: int, seq: int):
    step = 0
    while True:
        ids = sample_batch(vocab_size, micro, seq + 1, seed=100 + step)
        step += 1
        yield ids[:, :-1], ids[:, 1:]


def main():
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    ours = parser.parse_args(sys.argv[1:split])
    sys.argv = [sys.argv[0], *sys.argv[split + 1:]]

    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.core.utils import get_model_config
    from megatron.training import arguments, get_args, get_tokenizer, initialize
    from megatron.training.argument_utils import (gpt_config_from_args,
                                                  pretrain_cfg_container_from_args)
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.training import setup_model_and_optimizer, train_step

    from megatron_sppo.runtime import init_distributed

    # validate_args asks the GPU's architecture when TP > 1 (before Blackwell it requires
    # CUDA_DEVICE_MAX_CONNECTIONS=1): the CPU layer has no device properties, the CPU plays an
    # H100 (sm90) here
    arguments.get_device_arch_version = lambda: 9
    args = arguments.parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    full_config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    # pretrain() calls initialize_megatron(), which asserts CUDA and creates the model-parallel
    # groups only when it sees a CUDA device: on CPU the groups come first, from the project's
    # runtime (same sizes, megatron's default rank order), and allow_no_cuda skips the assert.
    # Its last step runs `make` for the dataset-index helpers, whose Makefile only a
    # Megatron-LM checkout has (the wheel ships them compiled): skipped here.
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    initialize._compile_dependencies = lambda: None
    initialize.initialize_megatron(allow_no_cuda=True)
    model, optimizer, scheduler = setup_model_and_optimizer(
        ModelType.encoder_or_decoder, checkpointing_context={}, cfg_container=full_config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    args = get_args()
    out = Path(ours.out)
    last_stage_writer = (parallel_state.is_pipeline_last_stage()
                         and parallel_state.get_tensor_model_parallel_rank() == 0)
    vocab = get_tokenizer().vocab_size
    ids = sample_batch(vocab, 2, 12)

    def probe(name):
        for chunk in model:
            chunk.eval()
        with torch.no_grad():
            logits = forward_logits(model[0], ids)
        for chunk in model:
            chunk.train()
        if last_stage_writer:
            torch.save(logits, out / name)

    probe("logits_loaded.pt")
    data = RerunDataIterator(batches(vocab, args.micro_batch_size, args.seq_length))
    config = get_model_config(model[0])
    for iteration in range(ours.steps):
        losses, skipped, *_, grad_norm, _, _ = train_step(
            forward_step, data, model, optimizer, scheduler, config, get_forward_backward_func(),
            iteration=iteration)
        if last_stage_writer:
            report({"iteration": iteration + 1, "lm_loss": float(losses["lm loss"]),
                    "skipped": bool(skipped), "grad_norm": float(grad_norm)})
    args.iteration = ours.steps
    save_checkpoint(ours.steps, model, optimizer, scheduler, 0)
    probe("logits_trained.pt")
    export_trained_weights(model, args, out)
    if torch.distributed.get_rank() == 0:
        torch.save(ids, out / "ids.pt")
        report({"saved_iteration": ours.steps, "padded_vocab_size": args.padded_vocab_size,
                "tokenizer_model": args.tokenizer_model, "num_layers": args.num_layers,
                "first_stage_layers": args.decoder_first_pipeline_num_layers})


def export_trained_weights(model, args, out: Path) -> None:
    """The live trained model under HF names (the reference the converted checkpoint must
    equal bit for bit): every stage's tensors gathered to rank 0."""
    from safetensors.torch import save_file

    from megatron_sppo.models.hf_config import arch_from_hf_config, load_hf_config
    from megatron_sppo.rollout.export import iter_hf_tensors_live

    arch = arch_from_hf_config(load_hf_config(args.tokenizer_model))
    tensors = {name: t.detach().clone().contiguous()
               for name, t in iter_hf_tensors_live(model, arch, gather_pipeline=True)}
    if torch.distributed.get_rank() == 0:
        save_file(tensors, str(out / "trained.safetensors"))


if __name__ == "__main__":
    main()
