"""The frozen reference policy for KL terms: built only when ``algorithm.kl_coef`` or
``algorithm.kl_in_reward`` is set, forward-only, and (on GPU) kept in host memory between
uses so it does not hold GPU memory during rollouts and updates."""

from __future__ import annotations

import torch

from megatron_sppo.config import Config
from megatron_sppo.data.packing import SequenceLayout
from megatron_sppo.runtime.groups import model_groups


class ReferenceModel:
    def __init__(self, module, arch, offload: bool, layout: SequenceLayout = SequenceLayout()):
        self.module, self.arch, self.layout = module.eval().requires_grad_(False), arch, layout
        self.offload = offload and torch.cuda.is_available()
        self.ddp = module  # forward-only schedules need no DDP wrapper
        self.groups = model_groups(module)
        if self.offload:
            self.module.cpu()

    @torch.no_grad()
    def logprobs(self, batch, cfg: Config) -> torch.Tensor:
        from megatron_sppo.trainer.rl_step import forward_logprobs

        if self.offload:
            self.module.cuda()
        try:
            return forward_logprobs(self, batch, cfg)
        finally:
            if self.offload:
                self.module.cpu()
                torch.cuda.empty_cache()


def build_reference(cfg: Config, checkpoint: str) -> ReferenceModel:
    """Collective: the policy's starting weights at the policy's layout, frozen."""
    from megatron_sppo.trainer.models import build_module, sequence_layout

    module, arch = build_module(cfg.policy, checkpoint, frozen=True)
    return ReferenceModel(module, arch, offload=True, layout=sequence_layout(cfg.policy))
