"""One real megatron-core training step on CPU: DDP, the pipeline schedule, the Megatron
optimizer (AdamW) with gradient clipping and its lr/weight-decay scheduler; the updated model is saved as a dist checkpoint.

Usage: torchrun --nproc-per-node N train_step.py HF_DIR --tp T --pp P --out DIR
       [--clip C] [--lr LR] [--microbatches M]
The test compares the loss, the grad norm and the exported updated weights with a plain
PyTorch step on the HF model (tests/test_megatron_runtime.py).
"""

import argparse

import torch
from common import causal_inputs, report, sample_batch

from megatron_sppo.checkpoint.convert import model_from_hf
from megatron_sppo.checkpoint.megatron_io import save_model_checkpoint
from megatron_sppo.models import mask_padded_logits
from megatron_sppo.runtime import init_distributed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--clip", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--microbatches", type=int, default=2)
    args = parser.parse_args()

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    init_distributed(args.tp, args.pp)
    arch, config, model = model_from_hf(args.hf_dir, tp=args.tp, pp=args.pp)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay,
                        adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=args.clip),
        [ddp])
    # The scheduler applies per-group lr and weight decay (no decay on biases and norms).
    OptimizerParamScheduler(optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr,
                            lr_warmup_steps=0, lr_decay_steps=1, lr_decay_style="constant",
                            start_wd=args.weight_decay, end_wd=args.weight_decay,
                            wd_incr_steps=1, wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batches = [sample_batch(arch.vocab_size, batch=2, seq=10, seed=s)
               for s in range(args.microbatches)]

    def step(data_iterator, model_chunk):
        ids = next(data_iterator)
        pos, mask = causal_inputs(ids)
        logits = model_chunk(ids, pos, mask)

        def loss_func(output):
            # megatron's cross entropy views its input: a slice of [b, s, v] must be copied
            output = mask_padded_logits(output[:, :-1].contiguous(), arch.vocab_size, tp_rank)
            ce = tensor_parallel.vocab_parallel_cross_entropy(output, ids[:, 1:])
            loss = ce.mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

        return logits, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=[ddp],
        num_microbatches=args.microbatches, seq_length=10, micro_batch_size=2)
    ok, grad_norm, _ = optimizer.step()
    save_model_checkpoint(model, args.out, 1, arch, args.hf_dir)
    if losses:
        loss = sum(d["loss"].item() for d in losses) / len(losses)
        report({"loss": loss, "grad_norm": float(grad_norm), "ok": bool(ok),
                "rank": torch.distributed.get_rank()})


if __name__ == "__main__":
    main()
