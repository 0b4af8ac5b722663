"""The model description Megatron-LM and Megatron-Bridge keep in a checkpoint, written from a
:class:`ModelArch` and read back into checkable facts.

* **Megatron-LM** (``megatron.training``; checked against megatron-core 0.19.2's
  ``training/checkpointing.py::load_args_from_checkpoint``): an ``argparse.Namespace`` under
  ``args`` in the dist-checkpoint's common state. ``--use-checkpoint-args`` takes from it the
  layer, hidden, FFN, head, query-group and kv-channel sizes, rope (type, base, percent), swiglu,
  the bias flags, RMSNorm, untied embeddings, the padded vocabulary, dropout and, with the
  default ``--use-tokenizer-model-from-checkpoint-args``, the tokenizer (HuggingFaceTokenizer
  at the checkpoint's ``hf_config/``). It does not take the norm epsilon, q/k layernorm,
  rope scaling or the dtype: :func:`extra_megatron_lm_flags` lists the flags for those.
* **Megatron-Bridge** (checked against NVIDIA-NeMo/Megatron-Bridge
  ``training/model_load_save.py``, ``training/utils/checkpoint_utils.py``,
  ``models/gpt_provider.py``, ``models/conversion/model_bridge.py`` CONFIG_MAPPING):
  ``iter_XXXXXXX/run_config.yaml``, whose ``model`` section is a GPTModelProvider
  (TransformerConfig fields plus ``vocab_size``, ``should_pad_vocab``, ``seq_length``,
  ``hf_model_id``; the newer builder form nests the TransformerConfig fields under
  ``transformer``) and whose ``tokenizer`` section names an HF tokenizer. Bridge keeps the
  vocabulary unpadded (``should_pad_vocab: false``); callables and dtypes are written as
  ``{_target_: ..., _call_: false}`` as megatron.training's ``yaml_utils`` represents them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import ModelArch
from megatron_sppo.models.stages import StageSplit

RUN_CONFIG = "run_config.yaml"
BRIDGE_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
BRIDGE_TOKENIZER = "megatron.bridge.training.tokenizers.config.TokenizerConfig"
BRIDGE_CHECKPOINT = "megatron.bridge.training.config.CheckpointConfig"

# ModelArch field -> (Megatron-LM args name, Bridge/TransformerConfig name): the facts checked
# against config.json when a checkpoint is read back
_FACTS = {
    "num_layers": ("num_layers", "num_layers"),
    "hidden_size": ("hidden_size", "hidden_size"),
    "ffn_hidden_size": ("ffn_hidden_size", "ffn_hidden_size"),
    "num_heads": ("num_attention_heads", "num_attention_heads"),
    "num_kv_heads": ("num_query_groups", "num_query_groups"),
    "head_dim": ("kv_channels", "kv_channels"),
    "qkv_bias": ("add_qkv_bias", "add_qkv_bias"),
    "qk_layernorm": ("qk_layernorm", "qk_layernorm"),
}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _dtype(name: str) -> dict:
    return {"_target_": f"torch.{name}", "_call_": False}


def megatron_lm_args(arch: ModelArch, tokenizer_dir: Path, tp: int, pp: int,
                     split: StageSplit) -> argparse.Namespace:
    """The ``args`` Megatron-LM saves with a checkpoint, for this model (plain values only, so
    the weights-only loader of ``dist_checkpointing.load_common_state_dict`` reads them)."""
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size, num_attention_heads=arch.num_heads,
        group_query_attention=arch.num_kv_heads != arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=False,
        use_rotary_position_embeddings=True, rotary_base=_number(arch.rope_theta),
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, swiglu=True, squared_relu=False,
        untie_embeddings_and_output_weights=not arch.tie_embeddings, apply_layernorm_1p=False,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, qk_layernorm=arch.qk_layernorm,
        apply_query_key_layer_scaling=False, attention_dropout=0.0, hidden_dropout=0.0,
        padded_vocab_size=arch.padded_vocab_size, tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tokenizer_dir), ckpt_format="torch_dist",
        bf16=arch.dtype == "bfloat16", fp16=arch.dtype == "float16",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        decoder_first_pipeline_num_layers=split.first, decoder_last_pipeline_num_layers=split.last,
    )


def extra_megatron_lm_flags(arch: ModelArch) -> list[str]:
    """Megatron-LM flags this model needs beyond ``--use-checkpoint-args`` (which does not
    carry the norm epsilon, q/k layernorm, rope scaling or the parameter dtype)."""
    flags = ["--norm-epsilon", f"{arch.norm_eps:g}"]
    if arch.dtype in ("bfloat16", "float16"):
        flags.append("--bf16" if arch.dtype == "bfloat16" else "--fp16")
    if arch.qk_layernorm:
        flags.append("--qk-layernorm")
    if arch.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", f"{arch.rope_scaling_factor:g}"]
    return flags


def bridge_run_config(arch: ModelArch, hf_dir: Path, root: Path, tp: int, pp: int,
                      split: StageSplit) -> dict:
    """A ``run_config.yaml`` in Megatron-Bridge's layout for this model (unpadded vocabulary,
    as Bridge stores it: Bridge builds its model with ``vocab_size`` rows and megatron-core
    trims the padded rows of this checkpoint on load)."""
    model = {
        "_target_": BRIDGE_PROVIDER,
        "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size, "num_attention_heads": arch.num_heads,
        "num_query_groups": arch.num_kv_heads, "kv_channels": arch.head_dim,
        "normalization": "RMSNorm", "layernorm_epsilon": arch.norm_eps,
        "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False, "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_layernorm, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "position_embedding_type": "rope", "rotary_base": _number(arch.rope_theta),
        "rotary_percent": 1.0, "rope_scaling": arch.rope_scaling_factor is not None,
        "rope_scaling_factor": arch.rope_scaling_factor or 1.0,
        "share_embeddings_and_output_weights": arch.tie_embeddings,
        "vocab_size": arch.vocab_size, "should_pad_vocab": False,
        "make_vocab_size_divisible_by": 128, "seq_length": arch.max_position_embeddings,
        "params_dtype": _dtype(arch.dtype), "bf16": arch.dtype == "bfloat16",
        "fp16": arch.dtype == "float16", "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "num_layers_in_first_pipeline_stage": split.first,
        "num_layers_in_last_pipeline_stage": split.last,
        "hf_model_id": str(hf_dir),
    }
    tokenizer = {"_target_": BRIDGE_TOKENIZER, "tokenizer_type": "HuggingFaceTokenizer",
                 "tokenizer_model": str(hf_dir), "hf_tokenizer_kwargs": {}}
    checkpoint = {"_target_": BRIDGE_CHECKPOINT, "ckpt_format": "torch_dist", "save": str(root)}
    return {"model": model, "tokenizer": tokenizer, "checkpoint": checkpoint}


def write_run_config(path: Path, config: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config, default_flow_style=False, sort_keys=False))


def read_run_config(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({e}): restore Megatron-Bridge's file")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{path} has no model section: it is not Megatron-Bridge's run config")
    return config


def _bridge_model(config: dict) -> dict:
    """The model section with the builder form's nested ``transformer`` fields flattened."""
    model = dict(config["model"])
    nested = model.pop("transformer", None)
    return {**(nested if isinstance(nested, dict) else {}), **model}


def facts_from_args(args) -> dict:
    """Checkable architecture facts from Megatron-LM's saved ``args``."""
    facts = {ours: getattr(args, name, None) for ours, (name, _) in _FACTS.items()}
    if not getattr(args, "group_query_attention", False):
        facts["num_kv_heads"] = facts["num_heads"]
    if facts["head_dim"] is None and facts["hidden_size"] and facts["num_heads"]:
        facts["head_dim"] = facts["hidden_size"] // facts["num_heads"]
    facts["tie_embeddings"] = not getattr(args, "untie_embeddings_and_output_weights", False)
    return facts


def facts_from_run_config(config: dict) -> dict:
    """Checkable architecture facts from a Bridge ``run_config.yaml``."""
    model = _bridge_model(config)
    facts = {ours: model.get(name) for ours, (_, name) in _FACTS.items()}
    if facts["num_kv_heads"] is None:
        facts["num_kv_heads"] = facts["num_heads"]
    if facts["head_dim"] is None and facts["hidden_size"] and facts["num_heads"]:
        facts["head_dim"] = facts["hidden_size"] // facts["num_heads"]
    facts["tie_embeddings"] = model.get("share_embeddings_and_output_weights", True)
    facts["vocab_size"] = model.get("vocab_size")
    return facts


def hf_dirs_named_in_run_config(config: dict) -> list[str]:
    """Where a Bridge run config says the HF model is (``hf_model_id``, the tokenizer)."""
    model = _bridge_model(config)
    extra = model.get("extra_checkpoint_metadata") or {}
    tokenizer = config.get("tokenizer") or {}
    return [p for p in (model.get("hf_model_id"), extra.get("hf_model_id"),
                        tokenizer.get("tokenizer_model")) if isinstance(p, str) and p]


def check_facts(arch: ModelArch, facts: dict, checkpoint: Path, config_dir: Path) -> None:
    """Refuse an HF config that describes another model than the checkpoint says it holds."""
    for field, value in facts.items():
        if value is None or field not in ModelArch.__dataclass_fields__:
            continue
        if getattr(arch, field) != value:
            raise UserError(f"{checkpoint} holds a model with {field}={value}, but "
                            f"{config_dir}/config.json gives {getattr(arch, field)}: pass "
                            "--hf-config DIR with the model's own config.json and tokenizer")
