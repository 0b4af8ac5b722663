"""What megatron-core needs to know about a Hugging Face dense decoder, read from config.json.

The raw config.json is read (not a transformers config object) so that both transformers 4.x
files (``rope_theta``/``rope_scaling``) and 5.x files (``rope_parameters``) are understood,
and every feature megatron-core's GPTModel cannot reproduce is refused here with one line,
before any tensor is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from megatron_sppo.errors import UserError

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}

# One padded vocabulary size for every TP degree (128 x 8 divides by any power of two up to
# 1024), recorded in the checkpoint so that it loads at any TP. A vocabulary of fewer than
# SMALL_VOCAB ids (tiny demo and test models) pads to a multiple of 64 instead, still divisible
# by any TP up to 64: padded to 1024, the demo's 263 ids made its output layer and softmax
# four times the work (checkpoints stored at either padding load into the other).
VOCAB_PAD_MULTIPLE = 1024
SMALL_VOCAB, SMALL_VOCAB_PAD_MULTIPLE = 8192, 64

# megatron-core's llama3 rope scaling fixes these three; only `factor` is a GPTModel argument.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelArch:
    """The architecture facts shared by the model builder and the checkpoint converters."""

    family: str
    vocab_size: int
    padded_vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    dtype: str

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise UserError(f"dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}: "
                            "set torch_dtype in config.json or pass --dtype")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def check_parallel(self, tp: int, pp: int, first: int | None = None,
                       last: int | None = None, names: tuple[str, str, str] | None = None,
                       ) -> None:
        """Refuse a TP/PP layout this model cannot be split into; ``first``/``last`` are the
        first and last pipeline stage's layer counts (:mod:`megatron_sppo.models.stages`)."""
        from megatron_sppo.models.stages import CLI_NAMES, stage_split

        if tp < 1 or pp < 1:
            raise UserError(f"tp={tp}, pp={pp}: both must be >= 1")
        if self.num_heads % tp:
            raise UserError(f"--tp {tp} does not divide num_attention_heads={self.num_heads}: "
                            f"use a --tp that divides {self.num_heads}")
        if self.num_kv_heads % tp:
            raise UserError(f"--tp {tp} does not divide num_key_value_heads={self.num_kv_heads}: "
                            f"use a --tp that divides {self.num_kv_heads}")
        if self.padded_vocab_size % tp:
            raise UserError(f"--tp {tp} does not divide the padded vocabulary "
                            f"{self.padded_vocab_size}: use a power-of-two --tp")
        stage_split(self.num_layers, pp, first, last, names or CLI_NAMES)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelArch":
        return cls(**data)


def padded_vocab(vocab_size: int, multiple: int | None = None) -> int:
    if multiple is None:
        multiple = SMALL_VOCAB_PAD_MULTIPLE if vocab_size < SMALL_VOCAB else VOCAB_PAD_MULTIPLE
    return int(math.ceil(vocab_size / multiple) * multiple)


def load_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found: --hf-path must be a Hugging Face model directory "
                        "with config.json and *.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download or re-save the model")


def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type") not in
                                          (None, "default") else None)
    return float(theta), scaling


def _check_rope_scaling(scaling: dict | None, family: str) -> float | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UserError(f"rope scaling type {kind!r} is not supported by megatron-core's "
                        "GPTModel (only 'llama3'): use a model without it")
    for key, expected in _MCORE_LLAMA3_FIXED.items():
        if float(scaling.get(key, expected)) != expected:
            raise UserError(f"llama3 rope scaling with {key}={scaling[key]} is not supported "
                            f"(megatron-core fixes {key}={expected})")
    return float(scaling["factor"])


def arch_from_hf_config(cfg: dict, vocab_pad_multiple: int | None = None) -> ModelArch:
    """Validate a config.json dict and translate it; unsupported features raise UserError."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in FAMILIES:
        raise UserError(f"unsupported architecture {archs or cfg.get('model_type')}: "
                        f"supported are {', '.join(FAMILIES)} (dense decoders)")
    family = FAMILIES[archs[0]]
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise UserError(f"{archs[0]} with experts (MoE) is not supported: use a dense model")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"hidden_act={act!r} is not supported: only SwiGLU (silu) decoders")
    if cfg.get("mlp_bias"):
        raise UserError("mlp_bias=true is not supported: megatron-core has no MLP-only bias")
    if family == "llama" and cfg.get("attention_bias"):
        raise UserError("attention_bias=true (bias on o_proj too) is not supported")
    window = cfg.get("sliding_window")
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    window_on = cfg.get("use_sliding_window", True) and window is not None
    active_window = window_on and (int(window) < max_pos
                                   or "sliding_attention" in (cfg.get("layer_types") or []))
    if active_window:
        raise UserError(f"an active sliding window ({window} < {max_pos} positions) is not "
                        "supported: use a model without sliding-window attention")
    theta, scaling = _rope(cfg)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UserError(f"num_attention_heads={heads} is not a multiple of "
                        f"num_key_value_heads={kv_heads}: the config is broken")
    hidden = int(cfg["hidden_size"])
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    vocab = int(cfg["vocab_size"])
    return ModelArch(
        family=family,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, vocab_pad_multiple),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=_check_rope_scaling(scaling, family),
        max_position_embeddings=max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        dtype=dtype,
    )
