"""The critic: a megatron-core GPTModel whose output layer is a scalar head.

As verl and slime build value models: the decoder is any HF checkpoint (the policy's or a
smaller one), embeddings untied, and on the last pipeline stage the vocabulary projection is
replaced by ``ScalarHead`` (hidden -> 1 logit per position). SPPO reads the logit at the last
prompt token, V(prompt) = sigmoid(logit); token-level PPO (GAE) reads one value per token.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_sppo.models.builder import build_gpt_model, to_current_device
from megatron_sppo.models.hf_config import ModelArch


class ScalarHead(torch.nn.Module):
    """Stands in for GPTModel.output_layer: forward(hidden [s, b, h]) -> ([s, b, 1] fp32, None).

    The head is new, so it starts at zero: every prompt gets V = 0.5 until it learns (the
    trainer may set the bias to the logit of a measured success rate). With sequence
    parallelism each TP rank scores its own slice of the sequence; the weight is marked
    ``sequence_parallel`` so megatron-core all-reduces its gradient across TP, and the
    scalar outputs (not the hidden states) are gathered.
    """

    def __init__(self, config, tp_group=None):
        super().__init__()
        self.sequence_parallel, self.tp_group = config.sequence_parallel, tp_group
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size,
                                                     dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            param.sequence_parallel = config.sequence_parallel

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out = torch.nn.functional.linear(input_, self.weight, self.bias).float()
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False,
                                                       group=self.tp_group)
        return out, None


def build_critic_model(arch: ModelArch, config, **kwargs):
    """GPTModel for this rank's stage with the scalar head on the last stage."""
    model = build_gpt_model(dataclasses.replace(arch, tie_embeddings=False), config, **kwargs)
    if model.post_process:  # a new module: on the model's device like the rest
        model.output_layer = to_current_device(ScalarHead(config, model.pg_collection.tp))
    return model


def logits_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[b, s, 1] critic outputs -> [b] logits at one position per sequence (SPPO: the last
    prompt token, i.e. prompt_length - 1 for right-padded prompts)."""
    return values.squeeze(-1).gather(1, positions.long().unsqueeze(1)).squeeze(1)
