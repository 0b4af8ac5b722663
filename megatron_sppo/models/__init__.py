"""HF config -> megatron-core models."""

from megatron_sppo.models.builder import build_gpt_model, transformer_config
from megatron_sppo.models.hf_config import ModelArch, arch_from_hf_config, load_hf_config
from megatron_sppo.models.vocab import mask_padded_logits

__all__ = ["ModelArch", "arch_from_hf_config", "load_hf_config", "build_gpt_model",
           "transformer_config", "mask_padded_logits"]
