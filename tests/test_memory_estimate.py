"""Memory estimate arithmetic on hand-computed cases: parameter counts (against the public
model sizes and transformers' own count), the per-GPU split under TP/PP, optimizer bytes,
Korthikanti et al.'s activation formula for the standard transformer, phases, and the CLI."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import REPO

from megatron_sppo.cluster.memory import (GIB, LOGIT_BYTES, PRESETS, Layout, activation_bytes,
                                          estimate, format_table, layer_activation_bytes,
                                          load_arch, model_memory, param_count, params_per_gpu)
from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import arch_from_hf_config

sys.path.insert(0, str(REPO / "tools"))
import estimate_memory  # noqa: E402

QWEN25_15B = {**PRESETS["R1-Distill-Qwen-1.5B"], "tie_word_embeddings": True}


def test_parameter_counts_of_public_models():
    # Qwen2.5-1.5B (tied embeddings) is published as 1.54B parameters
    assert param_count(arch_from_hf_config(QWEN25_15B)) == 1_543_714_304
    assert abs(param_count(arch_from_hf_config(QWEN25_15B)) / 1.54e9 - 1) < 0.01
    # the R1 distills untie the embeddings: 1.78B and 7.62B on their model cards
    assert param_count(load_arch("R1-Distill-Qwen-1.5B")) == 1_777_088_000
    assert param_count(load_arch("R1-Distill-Qwen-7B")) == 7_615_616_512
    # the critic swaps the 151936 x 1536 output layer for h -> 1
    assert param_count(load_arch("R1-Distill-Qwen-1.5B"), scalar_head=True) == (
        1_543_714_304 + 1536 + 1)


@pytest.mark.parametrize("family,extra", [
    ("Qwen2ForCausalLM", {}),
    ("Qwen3ForCausalLM", {"head_dim": 48}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True}),
])
def test_parameter_count_matches_transformers(family, extra):
    import torch
    import transformers

    cfg = {"architectures": [family], "hidden_size": 96, "intermediate_size": 200,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 300, "max_position_embeddings": 64, **extra}
    config_cls = getattr(transformers, family.replace("ForCausalLM", "Config"))
    hf_cfg = config_cls(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = getattr(transformers, family)(hf_cfg)
    assert param_count(arch_from_hf_config(cfg)) == sum(p.numel() for p in model.parameters())


def test_params_per_gpu_under_tp_and_pp():
    arch = load_arch("R1-Distill-Qwen-1.5B")
    assert arch.padded_vocab_size == 152_576
    # one layer 46,797,824 params, of which 2 x 1536 norm weights are replicated over TP
    per_layer_tp2 = (46_797_824 - 3072) // 2 + 3072
    embed_tp2 = 152_576 * 1536 // 2
    # pp=2: the last stage has 14 layers + final norm + the (untied) output layer
    assert params_per_gpu(arch, Layout(tp=2, pp=2)) == 14 * per_layer_tp2 + 1536 + embed_tp2
    # pp=1, tied: one embedding serves as output layer
    tied = arch_from_hf_config(QWEN25_15B)
    assert params_per_gpu(tied, Layout()) == param_count(tied, padded_vocab=True)
    # critic head on the last stage is h + 1
    assert params_per_gpu(arch, Layout(pp=2), scalar_head=True) == (
        152_576 * 1536 + 14 * 46_797_824)
    with pytest.raises(UserError, match="--tp 3"):
        params_per_gpu(arch, Layout(tp=3))


def test_optimizer_bytes_and_distributed_optimizer():
    arch = load_arch("R1-Distill-Qwen-1.5B")
    plain = model_memory("policy", arch, Layout(dp=8), 1024)
    p = plain.params
    assert (plain.weights, plain.grads, plain.optimizer) == (2 * p, 4 * p, 12 * p)
    dist = model_memory("policy", arch, Layout(dp=8, distributed_optimizer=True), 1024)
    assert dist.optimizer == 12 * p / 8 and dist.persistent == 6 * p + 1.5 * p
    offload = model_memory("policy", arch, Layout(dp=8, optimizer_offload=True), 1024)
    assert offload.optimizer == 0
    ref = model_memory("reference", arch, Layout(), 1024, trained=False)
    assert (ref.weights, ref.grads, ref.optimizer, ref.activations) == (2 * p, 0, 0, 0)


def _standard_arch(h=1024, a=16):
    """Multi-head attention; the MLP width 4h of the paper's model (used with gated_mlp=False)."""
    return arch_from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": h,
                                "intermediate_size": 4 * h, "num_hidden_layers": 2,
                                "num_attention_heads": a, "vocab_size": 1000})


@pytest.mark.parametrize("t", [1, 2, 8])
def test_korthikanti_formula_for_the_standard_transformer(t):
    arch = _standard_arch()
    s, b, h, a = 2048, 2, 1024, 16
    kw = dict(seq_len=s, flash_attention=False, dropout=True, gated_mlp=False)
    # Table 2 of arXiv:2205.05198
    assert layer_activation_bytes(s * b, arch, t, False, **kw) == pytest.approx(
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert layer_activation_bytes(s * b, arch, t, True, **kw) == pytest.approx(
        s * b * h / t * (34 + 5 * a * s / h))
    # selective recompute of attention = flash attention: the 5as/h term disappears
    assert layer_activation_bytes(s * b, arch, t, True, flash_attention=True, dropout=True,
                                  gated_mlp=False) == pytest.approx(34 * s * b * h / t)


def test_activations_of_the_real_model():
    arch = load_arch("R1-Distill-Qwen-1.5B")
    tokens, h, v = 4096, 1536, 152_576
    # no dropout, flash attention, SwiGLU 8960 wide, 2 KV heads of 128:
    # 8 + Q 2 + K,V 4*256/1536 + proj 2 + 6*8960/1536 = 47.666... (x s*b*h bytes)
    per_layer = tokens * h * (8 + 4 + 4 * 256 / 1536 + 6 * 8960 / 1536)
    assert layer_activation_bytes(tokens, arch) == pytest.approx(per_layer)
    assert per_layer == pytest.approx(299_892_736)
    out = 4 * tokens * h + LOGIT_BYTES * tokens * v
    assert activation_bytes(arch, Layout(), tokens) == pytest.approx(28 * per_layer + out)
    assert activation_bytes(arch, Layout(), tokens, logits=False) == pytest.approx(
        28 * per_layer + 4 * tokens * h)
    # full recompute keeps each layer's 2sbh input plus one layer being recomputed
    assert activation_bytes(arch, Layout(full_recompute=True), tokens) == pytest.approx(
        28 * 2 * tokens * h + per_layer + out)
    # TP 2 with sequence parallelism divides everything by 2, pipeline stages change nothing
    sp = activation_bytes(arch, Layout(tp=2, pp=2, sequence_parallel=True), tokens)
    assert sp == pytest.approx(activation_bytes(arch, Layout(), tokens) / 2)


def test_phases_and_verdict():
    arch = load_arch("R1-Distill-Qwen-1.5B")
    policy = model_memory("policy", arch, Layout(dp=4, distributed_optimizer=True), 8192)
    critic = model_memory("critic", arch, Layout(dp=4, distributed_optimizer=True), 1024,
                          scalar_head=True)
    est = estimate([policy, critic], sglang_fraction=0.5, gpu_gib=80, overhead_gib=2)
    persistent = policy.persistent + critic.persistent
    assert est.sglang == 40 * GIB
    assert est.training_phase == pytest.approx(persistent + policy.activations + 2 * GIB)
    assert est.rollout_phase == pytest.approx(persistent + 40 * GIB + 2 * GIB)
    kept = estimate([policy, critic], sglang_fraction=0.5, sglang_released=False, overhead_gib=2)
    assert kept.training_phase == pytest.approx(est.training_phase + 40 * GIB)
    assert est.fits == (est.peak <= 80 * GIB)
    table = format_table(est)
    assert "SGLang weights + KV cache" in table and "rollout phase" in table
    with pytest.raises(UserError, match="mem fraction"):
        estimate([policy], sglang_fraction=1.2)


def test_cli(tmp_path, capsys):
    base = ["--policy", "R1-Distill-Qwen-1.5B", "--gpus", "8", "--micro-batch-tokens", "2048"]
    assert estimate_memory.main(base) == 0
    out = capsys.readouterr().out
    assert "policy weights" in out and ": fits" in out
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["R1-Distill-Qwen-7B"]))
    too_big = ["--policy", str(tmp_path), "--critic", str(tmp_path / "config.json"),
               "--gpus", "8", "--micro-batch-tokens", "16384", "--sglang-mem-fraction", "0.8"]
    assert estimate_memory.main(too_big) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert estimate_memory.main([*base, "--tp", "3"]) == 2
    assert estimate_memory.main(["--policy", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
