"""HF config.json -> ModelArch: both transformers 4.x and 5.x spellings, and refusals."""

from __future__ import annotations

import pytest

from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import arch_from_hf_config, padded_vocab

BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 151936, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16"}


def test_transformers4_and_5_rope_spellings_agree():
    v4 = arch_from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    v5 = arch_from_hf_config({**BASE, "dtype": "bfloat16", "rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling_factor == 8.0


def test_derived_fields():
    arch = arch_from_hf_config({**BASE, "rope_theta": 1e6})
    assert arch.head_dim == 8 and arch.rope_scaling_factor is None
    assert arch.padded_vocab_size == 152576 == padded_vocab(151936)
    for tp in (1, 2, 4, 8):
        assert arch.padded_vocab_size % tp == 0  # one padded size for every TP
    assert padded_vocab(263) == 320 and padded_vocab(8191) == 8192  # small: multiples of 64
    assert padded_vocab(8193) == 9216
    assert arch.dtype == "bfloat16" and not arch.tie_embeddings
    qwen2 = arch_from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"],
                                 "use_sliding_window": False, "sliding_window": 4096})
    assert qwen2.qkv_bias and not qwen2.qk_layernorm
    qwen3 = arch_from_hf_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_layernorm and qwen3.head_dim == 32


@pytest.mark.parametrize("changes,needle", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "low_freq_factor"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding window"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
      "sliding_window": 4096}, "sliding window"),
    ({"architectures": ["MixtralForCausalLM"]}, "unsupported architecture"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"torch_dtype": "float8_e4m3fn"}, "dtype"),
])
def test_refused(changes, needle):
    with pytest.raises(UserError, match=None) as err:
        arch_from_hf_config({**BASE, **changes})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_parallel_checks():
    arch = arch_from_hf_config(BASE)
    arch.check_parallel(2, 4)
    with pytest.raises(UserError, match="--tp 4 does not divide num_key_value_heads=2"):
        arch.check_parallel(4, 1)
    arch.check_parallel(1, 3)  # 4 layers over 3 stages: the default uneven split 2 + 1 + 1
    with pytest.raises(UserError, match="--pp 5 is more than num_hidden_layers=4"):
        arch.check_parallel(1, 5)
    with pytest.raises(UserError, match="--decoder-last-pipeline-num-layers=3 leave 1"):
        arch.check_parallel(1, 3, last=3)
