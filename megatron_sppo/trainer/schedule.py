"""Run a mini-batch's micro-batches through megatron-core's forward/backward schedule.

Shared by the policy and the critic updates: the caller supplies the micro-batches (each
with its right-padded token ids, run causally through the model) and a loss that returns
``(loss_sum, denominator, stats)``. With
``config.calculate_per_token_loss`` megatron-core sums loss_sum and denominator over
micro-batches and data-parallel ranks and divides the gradients once, so the update is the
true mean over the whole mini-batch however it was split (tokens for the policy, prompts for
the SPPO critic). Forward-only runs return whatever ``stats`` the loss gives back.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def run_microbatches(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor, Any]],
                     loss: Callable[[torch.Tensor, Any], tuple],
                     forward_only: bool = False, pack_align: int | None = None) -> list[dict]:
    """micro_batches: (input_ids [b, s] right-padded, lengths [b], mb) triples;
    loss(model output [b, s, ...], mb) -> (loss_sum, denominator, stats). ``pack_align``: run
    each micro-batch as one THD pack (Transformer Engine), sequences padded to that multiple;
    the output is unpacked to [b, s, ...] before the loss. Returns the stats dicts (on the last
    pipeline stage; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from megatron_sppo.data.batching import to_device
    from megatron_sppo.data.packing import pack, packed_seq_params, plan_packing, unpack
    from megatron_sppo.models.inputs import causal_inputs
    from megatron_sppo.runtime.groups import model_groups

    device = next(model.parameters()).device

    def step(data_iterator, model_chunk):
        ids, lengths, mb = next(data_iterator)
        ids, mb = to_device(ids, device), to_device(mb, device)
        if pack_align is None:
            output, restore = model_chunk(ids, *causal_inputs(ids)), None
        else:
            plan = plan_packing(lengths.tolist(), pack_align)
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            output = model_chunk(pack(ids, plan), pack(positions, plan), None,
                                 packed_seq_params=packed_seq_params(plan, ids.device))
            restore = (plan, ids.shape[1])

        def loss_func(output):
            if restore is not None:
                output = unpack(output, *restore)
            loss_sum, denominator, stats = loss(output, mb)
            if forward_only:
                return loss_sum.detach() * 0.0, stats
            # the schedule scales loss_sum in place: report copies
            stats = {"loss_sum": loss_sum.detach().clone(),
                     "denominator": torch.as_tensor(denominator).detach().clone(), **stats}
            return loss_sum, torch.as_tensor(denominator).to(torch.int), stats

        return output, loss_func

    pg = model_groups(model).pg  # the model's own groups (a critic may have its own layout)
    return get_forward_backward_func(pp_size=pg.pp.size(), vp_size=None)(
        forward_step_func=step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches),
        seq_length=max(ids.shape[1] for ids, _, _ in micro_batches), micro_batch_size=1,
        forward_only=forward_only, pg_collection=pg,
        p2p_communicator=P2PCommunicator(pp_group=pg.pp, config=model.config))
