"""Memory per GPU of a training layout, estimated from model sizes before anything is queued.

Persistent state per trained model (megatron-core mixed precision, as in Megatron-LM's
distributed-optimizer notes): bf16 weights 2 bytes/param, fp32 main gradients 4, and Adam
with fp32 master weights, first and second moments 12, divided by the data-parallel size
under the distributed optimizer (0 on the GPU with optimizer CPU offload).

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models" (MLSys 2023, arXiv:2205.05198), Section 4: per layer, 16-bit activations,
s*b tokens, hidden h, a heads, TP degree t,

    no sequence parallelism:  s*b*h * (10 + 24/t + 5*a*s/(h*t))
    sequence parallelism:     s*b*h/t * (34 + 5*a*s/h)
    full recompute:           2*s*b*h per layer (/t with sequence parallelism), plus one
                              layer's activations while it is recomputed.

Their 34 counts a GELU MLP of 4h and multi-head attention; :func:`layer_activation_bytes`
keeps their per-tensor accounting but sizes each tensor by the real model (SwiGLU of width f
stores gate, up and product: 6f/h instead of 16; K and V shrink with grouped-query attention)
and, as their formula does, gives the standard numbers back for the standard model (tested).
Flash attention (Transformer Engine's fused attention) stores no s x s scores, which drops the
5*a*s/h term exactly as the paper's selective recompute does; dropout masks are counted only
with dropout (RL runs without). With pipeline parallelism under 1F1B the first stage holds p
micro-batches of L/p layers, i.e. L layers' worth, whatever p (Section 4.2.3).

Colocated SGLang reserves ``mem_fraction_static`` of the whole card for weights and KV cache
during rollouts; with its memory saver the trainer releases that during training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import ModelArch, arch_from_hf_config, load_hf_config

GIB = 1024**3

# config.json values of the public checkpoints (deepseek-ai/DeepSeek-R1-Distill-Qwen-*).
_R1_DISTILL_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643,
}
PRESETS = {
    "R1-Distill-Qwen-1.5B": {**_R1_DISTILL_COMMON, "hidden_size": 1536,
                             "intermediate_size": 8960, "num_hidden_layers": 28,
                             "num_attention_heads": 12, "num_key_value_heads": 2,
                             "max_window_layers": 21, "vocab_size": 151936},
    "R1-Distill-Qwen-7B": {**_R1_DISTILL_COMMON, "hidden_size": 3584,
                           "intermediate_size": 18944, "num_hidden_layers": 28,
                           "num_attention_heads": 28, "num_key_value_heads": 4,
                           "max_window_layers": 28, "vocab_size": 152064},
}

# Bytes per logit element at the output layer: bf16 logits (2) + the fp32 temperature-scaled
# copy (4) + the fp32 softmax vocab_parallel_cross_entropy keeps for backward (4). The paper
# counts 4 (fp32 logits only); a differentiated entropy bonus keeps ~3 more fp32 copies.
LOGIT_BYTES = 10


def load_arch(spec: str) -> ModelArch:
    """A preset name, an HF model directory, or a config.json path."""
    if spec in PRESETS:
        return arch_from_hf_config(PRESETS[spec])
    path = Path(spec)
    if path.is_file():
        try:
            return arch_from_hf_config(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
    if path.is_dir():
        return arch_from_hf_config(load_hf_config(path))
    raise UserError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an HF "
                    "model directory or config.json")


def layer_params(arch: ModelArch) -> int:
    """Parameters of one decoder layer (attention, SwiGLU MLP, two norms)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if arch.qkv_bias else 0)
    mlp = 3 * h * arch.ffn_hidden_size
    norms = 2 * h + (2 * d if arch.qk_layernorm else 0)
    return attn + mlp + norms


def param_count(arch: ModelArch, padded_vocab: bool = False, scalar_head: bool = False) -> int:
    """All parameters: the HF count by default; ``padded_vocab`` counts Megatron's padded
    embedding; ``scalar_head`` replaces the vocabulary projection by the critic's h -> 1."""
    vocab = arch.padded_vocab_size if padded_vocab else arch.vocab_size
    embed = vocab * arch.hidden_size
    if scalar_head:
        head = arch.hidden_size + 1
    else:
        head = 0 if arch.tie_embeddings else embed
    return embed + arch.num_layers * layer_params(arch) + arch.hidden_size + head


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one model is split and what saves memory. ``dp`` is its data-parallel size."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    full_recompute: bool = False
    optimizer_offload: bool = False


def params_per_gpu(arch: ModelArch, layout: Layout, scalar_head: bool = False) -> int:
    """Parameters on the fullest GPU: the largest stage's layers (the default split of
    :mod:`megatron_sppo.models.stages`) split by TP (norms replicated), plus the
    embedding on the first stage and the output layer on the last (one stage if pp == 1;
    Megatron keeps a copy of tied embeddings on the last stage when pp > 1)."""
    from megatron_sppo.models.stages import layers_per_stage, stage_split

    arch.check_parallel(layout.tp, layout.pp)
    tp, pp = layout.tp, layout.pp
    norms = 2 * arch.hidden_size + (2 * arch.head_dim if arch.qk_layernorm else 0)
    per_layer = (layer_params(arch) - norms) // tp + norms
    split = stage_split(arch.num_layers, pp)
    layers = max(layers_per_stage(arch.num_layers, pp, split)) * per_layer
    embed = arch.padded_vocab_size * arch.hidden_size // tp
    if scalar_head:
        head = arch.hidden_size + 1
    else:
        head = 0 if (arch.tie_embeddings and pp == 1) else embed
    last = layers + arch.hidden_size + head
    return embed + last if pp == 1 else max(embed + layers, last)


def layer_activation_bytes(tokens: int, arch: ModelArch, tp: int = 1,
                           sequence_parallel: bool = False, *, seq_len: int | None = None,
                           flash_attention: bool = True, dropout: bool = False,
                           gated_mlp: bool = True) -> float:
    """Activation bytes one layer keeps for backward, for ``tokens`` = s*b tokens.

    Korthikanti et al.'s per-tensor terms in units of s*b*h bytes. Outside the TP region (and
    so divided by t only with sequence parallelism): the two norm inputs 4, QKV input 2, MLP
    input 2, dropout masks 2. Inside it (divided by t): Q 2q, K and V 2k each, projection
    input 2q (q = a*d/h and k = kv*d/h: 1 and 1 for standard multi-head attention), MLP 6f/h
    (SwiGLU: gate, up, product) or 4f/h (GELU: input, output), and without flash attention
    the scores: softmax 2*a*s/h (+3*a*s/h with dropout). ``seq_len`` (s) is needed only
    without flash attention.
    """
    h, a = arch.hidden_size, arch.num_heads
    q = a * arch.head_dim / h
    k = arch.num_kv_heads * arch.head_dim / h
    outside = 8 + (2 if dropout else 0)
    inside = 4 * q + 4 * k + (6 if gated_mlp else 4) * arch.ffn_hidden_size / h
    if not flash_attention:
        if seq_len is None:
            raise ValueError("seq_len is needed to count attention scores without flash attention")
        inside += (5 if dropout else 2) * a * seq_len / h
    split = tp if sequence_parallel else 1
    return tokens * h * (outside / split + inside / tp)


def activation_bytes(arch: ModelArch, layout: Layout, tokens: int, logits: bool = True) -> float:
    """Activations of one model's micro-batch of ``tokens`` on the fullest GPU: L layers' worth
    (see the module docstring), with full recompute the layer inputs plus one working layer,
    and the output layer's norm/projection inputs and (policy) logits."""
    sp = layout.sequence_parallel and layout.tp > 1
    split = layout.tp if sp else 1
    one_layer = layer_activation_bytes(tokens, arch, layout.tp, sp)
    if layout.full_recompute:
        layers = arch.num_layers * 2 * tokens * arch.hidden_size / split + one_layer
    else:
        layers = arch.num_layers * one_layer
    out = 4 * tokens * arch.hidden_size / split
    if logits:
        out += LOGIT_BYTES * tokens * arch.padded_vocab_size / layout.tp
    return layers + out


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """Bytes per GPU of one model."""

    name: str
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def persistent(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_memory(name: str, arch: ModelArch, layout: Layout, tokens: int, *,
                 trained: bool = True, scalar_head: bool = False) -> ModelMemory:
    """One model's bytes per GPU; an untrained one (reference policy) holds bf16 weights only."""
    params = params_per_gpu(arch, layout, scalar_head)
    if not trained:
        return ModelMemory(name, params, 2.0 * params, 0.0, 0.0, 0.0)
    optimizer = 0.0 if layout.optimizer_offload else 12.0 * params / (
        layout.dp if layout.distributed_optimizer else 1)
    return ModelMemory(name, params, 2.0 * params, 4.0 * params, optimizer,
                       activation_bytes(arch, layout, tokens, logits=not scalar_head))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The models on one GPU, colocated SGLang's reservation, and the two phases' totals."""

    models: list[ModelMemory]
    sglang: float
    sglang_released: bool
    overhead: float
    capacity: float

    @property
    def training_phase(self) -> float:
        """All persistent state + the largest model's activations (the models' forward and
        backward passes do not overlap) + SGLang unless released."""
        return (sum(m.persistent for m in self.models) + max(m.activations for m in self.models)
                + (0.0 if self.sglang_released else self.sglang) + self.overhead)

    @property
    def rollout_phase(self) -> float:
        return sum(m.persistent for m in self.models) + self.sglang + self.overhead

    @property
    def peak(self) -> float:
        return max(self.training_phase, self.rollout_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def estimate(models: list[ModelMemory], *, sglang_fraction: float | None = None,
             sglang_released: bool = True, gpu_gib: float = 80.0,
             overhead_gib: float = 3.0) -> Estimate:
    """``sglang_fraction``: colocated SGLang's mem_fraction_static (None: not colocated).
    ``overhead_gib``: CUDA context, NCCL buffers and allocator slack, an assumption."""
    if sglang_fraction is not None and not 0 < sglang_fraction < 1:
        raise UserError(f"SGLang mem fraction {sglang_fraction} must be in (0, 1)")
    capacity = gpu_gib * GIB
    return Estimate(models, (sglang_fraction or 0.0) * capacity, sglang_released,
                    overhead_gib * GIB, capacity)


def format_table(est: Estimate) -> str:
    """The estimate as a plain-text table in GiB."""
    rows = []
    for m in est.models:
        rows += [(f"{m.name} weights (bf16, {m.params / 1e9:.3g}B params on this GPU)", m.weights),
                 (f"{m.name} grads (fp32)", m.grads),
                 (f"{m.name} Adam states + fp32 master weights", m.optimizer),
                 (f"{m.name} activations (one micro-batch)", m.activations)]
    rows = [(label, value) for label, value in rows if value]
    if est.sglang:
        rows.append(("SGLang weights + KV cache (mem-fraction-static)", est.sglang))
    rows.append(("CUDA context, NCCL, allocator slack (assumed)", est.overhead))
    note = " (SGLang memory released)" if est.sglang and est.sglang_released else ""
    totals = [(f"training phase{note}", est.training_phase), ("rollout phase", est.rollout_phase)]
    width = max(len(label) for label, _ in rows + totals)
    lines = [f"{label:<{width}}  {value / GIB:8.2f} GiB" for label, value in rows]
    lines.append("-" * (width + 14))
    lines += [f"{label:<{width}}  {value / GIB:8.2f} GiB" for label, value in totals]
    verdict = "fits" if est.fits else "does NOT fit"
    lines.append(f"peak {est.peak / GIB:.2f} GiB of {est.capacity / GIB:.0f} GiB: {verdict}")
    return "\n".join(lines)
