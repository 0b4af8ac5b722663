"""The token-level critic (PPO/GAE baseline) through megatron-core's schedule: forward-only
values equal a direct model call, and the update's loss is the clipped value loss of them."""

import torch

from megatron_sppo.algorithms import clipped_value_loss
from megatron_sppo.models.inputs import causal_inputs
from megatron_sppo.trainer.critic_update import TokenCriticBatch, token_critic_forward_backward


def test_token_critic_values_and_loss(zoo, megatron_tp1):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    from megatron_sppo.checkpoint.convert import model_from_hf

    arch, config, model = model_from_hf(zoo["llama_gqa_untied"], critic=True,
                                        calculate_per_token_loss=True)
    config.finalize_model_grads_func = finalize_model_grads
    with torch.no_grad():
        model.output_layer.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), module=model)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 4, 6])
    ids = torch.randint(0, arch.vocab_size, (3, 7), generator=g)
    mask = (torch.arange(6) >= 2) & (torch.arange(6) < lengths[:, None] - 1)
    batch = TokenCriticBatch(ids, lengths, mask)
    results = token_critic_forward_backward(ddp, batch, max_tokens=8, forward_only=True)
    assert len(results) == 3  # budget 8: one sequence per micro-batch
    with torch.no_grad():
        direct = model(ids, *causal_inputs(ids))[:, :-1, 0]
    for r in results:
        for k, row in enumerate(r["rows"]):
            width = r["values"].shape[1]
            assert torch.allclose(r["values"][k], direct[row, :width], atol=1e-5)
    batch.old_values = direct
    batch.returns = torch.rand(3, 6, generator=g)
    ddp.zero_grad_buffer()
    results = token_critic_forward_backward(ddp, batch, max_tokens=8)
    total = sum(r["loss_sum"].item() for r in results) / sum(r["denominator"].item() for r in results)
    expected = clipped_value_loss(direct, direct, batch.returns, mask).loss.item()
    assert abs(total - expected) < 1e-5
    assert model.output_layer.weight.main_grad.abs().sum() > 0
