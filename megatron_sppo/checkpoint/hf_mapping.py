"""Names and tensor layouts between Hugging Face dense decoders and megatron-core GPTModel.

Megatron names here are *canonical*: global layer numbers and Transformer Engine's fused
layernorm names (``linear_qkv.layer_norm_weight``), which is also how megatron-core's local
spec names these weights in its sharded state dict. :func:`canonical_name` translates a
local-spec, pipeline-local parameter name into this form.

Layouts (the public references checked: Megatron-Bridge param_mapping.py, mbridge
core/bridge.py, slime megatron_to_hf):
* linear_qkv: per query group g, the group's q heads, then its k head, then its v head, so a
  TP shard is a contiguous chunk of groups;
* linear_fc1: per TP rank r, cat(gate_r, up_r) (at TP=1 simply cat(gate, up));
* embedding/output_layer: vocabulary padded with zero rows to ``arch.padded_vocab_size``.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from megatron_sppo.models.hf_config import ModelArch

# kind -> TP partition of the megatron tensor: "rep" replicated, "col" dim 0, "row" dim 1;
# "qkv", "fc1" and "vocab" are column-parallel with a layout of their own.
_LAYER_PARAMS = (  # (megatron suffix, HF suffixes, kind, arch flag that must be set)
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv", None),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                        "self_attn.v_proj.bias"), "qkv", "qkv_bias"),
    ("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), "rep", None),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "rep", "qk_layernorm"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "rep", "qk_layernorm"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row", None),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1", None),
    ("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), "rep", None),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row", None),
)

_LOCAL_SPEC_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One megatron-core parameter and the HF tensors it is assembled from."""

    megatron: str
    hf: tuple[str, ...]
    kind: str


def param_mappings(arch: ModelArch) -> list[ParamMapping]:
    """Every megatron parameter of the model, in HF order (embedding, layers, norm, head)."""
    out = [ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                        "vocab")]
    for i in range(arch.num_layers):
        for suffix, hf_suffixes, kind, flag in _LAYER_PARAMS:
            if flag and not getattr(arch, flag):
                continue
            out.append(ParamMapping(f"decoder.layers.{i}.{suffix}",
                                    tuple(f"model.layers.{i}.{s}" for s in hf_suffixes), kind))
    out.append(ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "rep"))
    head = "model.embed_tokens.weight" if arch.tie_embeddings else "lm_head.weight"
    out.append(ParamMapping("output_layer.weight", (head,), "vocab"))
    return out


def hf_names(arch: ModelArch) -> list[str]:
    """The HF tensors a checkpoint of this architecture holds (tied heads have no lm_head)."""
    names = []
    for m in param_mappings(arch):
        names.extend(n for n in m.hf if n not in names)
    return names


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for every HF tensor (checked before converting)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    per_suffix = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,), "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
    }
    shapes = {}
    for name in hf_names(arch):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shapes[name] = (arch.vocab_size, h)
        elif name == "model.norm.weight":
            shapes[name] = (h,)
        else:
            shapes[name] = per_suffix[name.split(".", 3)[3]]
    return shapes


def canonical_name(local_name: str, layer_offset: int = 0) -> str:
    """Local-spec, pipeline-local parameter name -> canonical global megatron name."""
    match = re.match(r"(decoder\.layers\.)(\d+)\.(.*)", local_name)
    if not match:
        return local_name
    prefix, index, rest = match.groups()
    rest = _LOCAL_SPEC_ALIASES.get(rest, rest)
    return f"{prefix}{int(index) + layer_offset}.{rest}"


# ---- HF tensors -> one TP shard of a megatron tensor -------------------------------------


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_groups: int) -> torch.Tensor:
    """[q; k; v] in HF order -> megatron's per-group [q_g; k_g; v_g] (weights or biases)."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, -1, *rest)
    k = k.reshape(num_groups, -1, *rest)
    v = v.reshape(num_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`interleave_qkv` for the full (all TP shards) tensor."""
    groups, hd = arch.num_kv_heads, arch.head_dim
    per_group = arch.num_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * hd, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * hd, hd, hd], dim=1)
    rest = qkv.shape[1:]
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def split_fc1(fc1: torch.Tensor, tp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Full linear_fc1 gathered from ``tp`` ranks ([g_0; u_0; g_1; u_1; ...]) -> gate, up."""
    pairs = [shard.chunk(2, dim=0) for shard in fc1.chunk(tp, dim=0)]
    gate = torch.cat([g for g, _ in pairs]).contiguous()
    up = torch.cat([u for _, u in pairs]).contiguous()
    return gate, up


def megatron_shard(mapping: ParamMapping, hf_tensors: list[torch.Tensor], arch: ModelArch,
                   tp: int = 1, rank: int = 0) -> torch.Tensor:
    """The tensor TP rank ``rank`` of ``tp`` holds for ``mapping``, built from HF tensors."""
    kind = mapping.kind
    if kind == "rep":
        return hf_tensors[0]
    if kind == "row":
        return hf_tensors[0].chunk(tp, dim=1)[rank]
    if kind == "vocab":
        return _pad_vocab(hf_tensors[0], arch.padded_vocab_size).chunk(tp, dim=0)[rank]
    if kind == "fc1":
        gate, up = (t.chunk(tp, dim=0)[rank] for t in hf_tensors)
        return torch.cat([gate, up])
    if kind == "qkv":
        q, k, v = (t.chunk(tp, dim=0)[rank] for t in hf_tensors)
        return interleave_qkv(q, k, v, arch.num_kv_heads // tp)
    raise ValueError(f"unknown mapping kind {kind!r}")


def hf_tensors_from_megatron(mapping: ParamMapping, full: torch.Tensor, arch: ModelArch,
                             tp: int = 1) -> dict[str, torch.Tensor]:
    """Full megatron tensor (TP shards concatenated along their partition dim) -> HF tensors."""
    kind = mapping.kind
    if kind == "vocab":
        parts = (full[: arch.vocab_size],)
    elif kind == "fc1":
        parts = split_fc1(full, tp)
    elif kind == "qkv":
        parts = split_qkv(full, arch)
    else:
        parts = (full,)
    return dict(zip(mapping.hf, parts))
