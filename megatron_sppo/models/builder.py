"""ModelArch -> megatron-core TransformerConfig and GPTModel (the one place models are built).

Transformer Engine's layer spec is used when TE and a GPU are present (fused kernels, FP8,
packed sequences); megatron-core's local spec otherwise. Both produce the same dist-checkpoint
keys for the weights (the local spec maps its separate layernorms onto TE's fused names in
``sharded_state_dict``), so a checkpoint written by either loads in the other.
megatron-core 0.19 marks GPTModel deprecated in favour of HybridModel; keeping construction
here keeps a later migration local.
"""

from __future__ import annotations

import warnings

import torch

from megatron_sppo.models.hf_config import ModelArch


def use_transformer_engine() -> bool:
    """TE kernels need both the package and a CUDA device."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE) and torch.cuda.is_available()


def transformer_config(arch: ModelArch, *, tp: int = 1, pp: int = 1,
                       params_dtype: torch.dtype | None = None,
                       first_stage_layers: int | None = None,
                       last_stage_layers: int | None = None, **overrides):
    """The TransformerConfig that reproduces the HF model exactly (dropout 0, RMSNorm, SwiGLU).

    ``first_stage_layers``/``last_stage_layers``: uneven pipeline stages (Megatron-LM's
    ``--decoder-first/last-pipeline-num-layers``); when pp does not divide the layer count and
    neither is given, the default split of :mod:`megatron_sppo.models.stages` applies.
    ``overrides`` are passed through (recompute, sequence parallelism, FP8, ...).
    """
    from megatron.core.transformer import TransformerConfig

    from megatron_sppo.models.stages import stage_split

    params_dtype = params_dtype or arch.torch_dtype
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        layernorm_epsilon=arch.norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        **stage_split(arch.num_layers, pp, first_stage_layers, last_stage_layers).config_kwargs(),
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():  # megatron's own default cuda_graph_scope warns about itself
        warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
        return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, use_te: bool | None = None):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te if use_te is not None else use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=arch.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm,
                                                    normalization="RMSNorm")


def build_gpt_model(arch: ModelArch, config, *, pre_process: bool | None = None,
                    post_process: bool | None = None, parallel_output: bool = True,
                    use_te: bool | None = None, groups=None):
    """The policy's megatron-core GPTModel for this rank's pipeline stage, on ``groups``
    (:class:`megatron_sppo.runtime.groups.ModelGroups`; default: megatron's global groups)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_sppo.runtime.groups import global_groups

    groups = groups or global_groups()
    if pre_process is None:
        pre_process = groups.is_first_stage
    if post_process is None:
        post_process = groups.is_last_stage
    rotary_base = arch.rope_theta
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        pg_collection=groups.pg,
    )
    return to_current_device(model)


def to_current_device(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer on this rank's GPU, as megatron.training's ``get_model``
    does after building: layers without a device argument (the local spec's norms) are made
    on the host even when ``use_cpu_initialization`` is off. A no-op without CUDA."""
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    return module
