"""128x128 block FP8 against a float64 reference: scales, per-element round-trip bounds,
exact values, odd shapes, zero blocks, payload names, the block-FP8 checkpoint, SGLang's
shape rules, the refusal to push bf16 to an online-FP8 server, and nvidia-modelopt's
block quantiser as an independent implementation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_sppo.cluster.memory import PRESETS
from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import arch_from_hf_config
from megatron_sppo.quant.fp8_block import (FP8_MAX, QUANTIZATION_CONFIG,
                                           check_sglang_block_layout, dequantize_block_fp8,
                                           is_quantized_weight, quantize_block_fp8,
                                           quantize_named_tensors, scale_name,
                                           sync_payload_format, write_block_fp8_checkpoint)

SHAPES = [(256, 384), (300, 200), (129, 127), (1, 1), (128, 1000), (7, 260)]


def reference_amax(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """max |w| per block, block by block in float64."""
    w = w.double()
    rows, cols = w.shape
    out = torch.empty(math.ceil(rows / block), math.ceil(cols / block), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = w[i * block:(i + 1) * block, j * block:(j + 1) * block].abs().max()
    return out


def expand(scales: torch.Tensor, shape, block: int = 128) -> torch.Tensor:
    return scales.repeat_interleave(block, 0).repeat_interleave(block, 1)[:shape[0], :shape[1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_e4m3_rounding(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    # per-row magnitudes spanning 1e-4..1e2 so blocks have very different scales
    w = (torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[0])[:, None]).to(dtype)
    q, scale_inv = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    amax = reference_amax(w)
    ref = torch.where(amax > 0, amax / 448.0, 1.0)
    torch.testing.assert_close(scale_inv.double(), ref, rtol=1e-6, atol=0)
    assert q.float().abs().max() <= FP8_MAX
    deq = dequantize_block_fp8(q, scale_inv, dtype=torch.float32).double()
    x, s = w.double(), expand(ref, shape)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal step 2^-9
    bound = torch.maximum(x.abs() / 16, s / 1024) * (1 + 1e-5)
    assert ((deq - x).abs() <= bound).all()
    # each block's largest element maps to +-448 and comes back (up to float32 rounding)
    at_amax = x.abs() == expand(amax, shape)
    assert at_amax.sum() >= amax.numel()
    assert ((deq - x).abs()[at_amax] <= 1e-6 * x.abs()[at_amax]).all()
    assert (q.float().abs()[at_amax] == FP8_MAX).all()


def test_representable_values_are_exact():
    """Weights that are e4m3 values times a power-of-two block scale come back exactly."""
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(256, 256, generator=g).to(torch.float8_e4m3fn).float()
    grid[0, 0] = grid[0, 128] = grid[128, 0] = grid[128, 128] = 448.0  # amax of each block
    w = grid * expand(torch.tensor([[2.0**-3, 2.0**5], [1.0, 2.0**-10]]), grid.shape)
    q, scale_inv = quantize_block_fp8(w)
    assert torch.equal(dequantize_block_fp8(q, scale_inv, dtype=torch.float32), w)
    assert torch.equal(q.float(), grid)


def test_zero_blocks_stay_finite():
    w = torch.randn(200, 300)
    w[:128, 128:256] = 0  # a full zero block
    w[128:, 256:] = 0  # a zero edge block (72 x 44)
    q, scale_inv = quantize_block_fp8(w)
    assert scale_inv[0, 1] == 1.0 and scale_inv[1, 2] == 1.0
    assert torch.isfinite(scale_inv).all() and not q.float().isnan().any()
    deq = dequantize_block_fp8(q, scale_inv, dtype=torch.float32)
    assert (deq[:128, 128:256] == 0).all() and (deq[128:, 256:] == 0).all()
    qz, sz = quantize_block_fp8(torch.zeros(5, 5, dtype=torch.bfloat16))
    assert (qz.float() == 0).all() and sz.tolist() == [[1.0]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="inf/NaN"):
        quantize_block_fp8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.ones(4))
    q, s = quantize_block_fp8(torch.ones(130, 10))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_block_fp8(q, s[:1])


def qwen2_stream(layers: int = 2, h: int = 256, kv: int = 128, ffn: int = 384, vocab: int = 300):
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    yield "model.embed_tokens.weight", t(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", t(h)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h))):
            yield p + f"self_attn.{name}.weight", t(*shape)
            yield p + f"self_attn.{name}.bias", t(shape[0])
        yield p + "self_attn.o_proj.weight", t(h, h)
        yield p + "post_attention_layernorm.weight", t(h)
        yield p + "mlp.gate_proj.weight", t(ffn, h)
        yield p + "mlp.up_proj.weight", t(ffn, h)
        yield p + "mlp.down_proj.weight", t(h, ffn)
    yield "model.norm.weight", t(h)
    yield "lm_head.weight", t(vocab, h)


def test_payload_names_shapes_and_passthrough():
    source = list(qwen2_stream())
    out = list(quantize_named_tensors(iter(source)))
    projections = [n for n, _ in source if is_quantized_weight(n)]
    assert len(projections) == 2 * 7
    assert len(out) == len(source) + len(projections)
    by_name = dict(out)
    for name, tensor in source:
        if name in projections:
            i = [n for n, _ in out].index(name)
            assert out[i + 1][0] == scale_name(name) == name[:-len("weight")] + "weight_scale_inv"
            assert by_name[name].dtype == torch.float8_e4m3fn
            rows, cols = tensor.shape
            assert by_name[scale_name(name)].shape == (math.ceil(rows / 128), math.ceil(cols / 128))
        else:  # embeddings, norms, biases, lm_head: untouched
            assert by_name[name] is tensor
    assert not is_quantized_weight("model.layers.0.self_attn.q_proj.bias")
    assert not is_quantized_weight("lm_head.weight")
    assert not is_quantized_weight("model.embed_tokens.weight")


def test_block_fp8_checkpoint(tmp_path):
    src, dst = tmp_path / "bf16", tmp_path / "fp8"
    src.mkdir()
    tensors = dict(qwen2_stream(layers=1))
    save_file(tensors, str(src / "model.safetensors"))
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "torch_dtype": "bfloat16"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text("{}")
    write_block_fp8_checkpoint(src, dst)
    written = json.loads((dst / "config.json").read_text())
    assert written["quantization_config"] == QUANTIZATION_CONFIG
    assert written["hidden_size"] == 256 and (dst / "tokenizer.json").is_file()
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale_inv")
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert names == set(tensors) | {scale_name(n) for n in tensors if is_quantized_weight(n)}
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    original = tensors["model.layers.0.mlp.down_proj.weight"].float()
    deq = dequantize_block_fp8(q, s, dtype=torch.float32)
    assert ((deq - original).abs() <= original.abs() / 16 + 1e-2).all()
    with pytest.raises(UserError, match="already quantised"):
        write_block_fp8_checkpoint(dst, tmp_path / "again")


BLOCK_CFG = {"quantization_config": QUANTIZATION_CONFIG}


@pytest.mark.parametrize("quantization,config,load_format,expected", [
    (None, {}, None, "bf16"),
    (None, BLOCK_CFG, None, "fp8_block"),
    ("fp8", BLOCK_CFG, None, "fp8_block"),
    ("fp8", {}, "flash_rl", "bf16"),
])
def test_sync_payload_format(quantization, config, load_format, expected):
    assert sync_payload_format(quantization, config, load_format) == expected


@pytest.mark.parametrize("quantization,config,message", [
    ("fp8", {}, "does not re-quantise bf16 weights pushed later"),
    ("awq", {}, "not supported with weight sync"),
    ("w8a8_fp8", BLOCK_CFG, "leave it unset"),
    (None, {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
     "not 128x128 block FP8"),
])
def test_sync_payload_refusals(quantization, config, message):
    with pytest.raises(UserError, match=message) as err:
        sync_payload_format(quantization, config)
    assert "\n" not in str(err.value)


def test_sglang_block_layout_rules():
    small = arch_from_hf_config(PRESETS["R1-Distill-Qwen-1.5B"])
    big = arch_from_hf_config(PRESETS["R1-Distill-Qwen-7B"])
    for tp in (1, 2):
        check_sglang_block_layout(small, tp)
    with pytest.raises(UserError, match="gate/up_proj rows per rank = 2240"):
        check_sglang_block_layout(small, 4)  # 8960 / 4 = 17.5 blocks
    for tp in (1, 2, 4):
        check_sglang_block_layout(big, tp)
    with pytest.raises(UserError, match="q_proj rows per rank = 448"):
        check_sglang_block_layout(big, 8)


def test_matches_modelopt_block_quantiser():
    """nvidia-modelopt's FP8QTensor (CPU) with 128x128 blocks: same scales, same fp8 bytes
    for float32 weights without zero blocks (it divides in the input dtype and gives zero
    blocks a 0 scale, hence NaN, which is where the two differ by design)."""
    fp8_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.fp8_tensor")
    g = torch.Generator().manual_seed(3)
    for shape in [(256, 384), (300, 200), (129, 1)]:
        w = torch.randn(shape, generator=g) * 0.02
        ours_q, ours_s = quantize_block_fp8(w)
        theirs, theirs_s = fp8_tensor.FP8QTensor.quantize(w, block_sizes={-1: 128, -2: 128})
        assert torch.equal(ours_s, theirs_s.float())
        assert torch.equal(ours_q.view(torch.uint8), theirs._quantized_data.view(torch.uint8))
        theirs_deq = theirs.dequantize(dtype=torch.float32, scale=theirs_s,
                                       block_sizes={-1: 128, -2: 128})
        assert torch.equal(dequantize_block_fp8(ours_q, ours_s, dtype=torch.float32), theirs_deq)


def test_convert_command_and_trainer_payload_choice(tmp_path):
    """`megatron-sppo convert hf-to-block-fp8` writes a complete copy (never a half one), and
    the trainer picks the payload the SGLang checkpoint needs before launching anything."""
    from megatron_sppo.cli import main
    from megatron_sppo.config import load_config
    from megatron_sppo.models.tiny import make_tiny_hf_model
    from megatron_sppo.trainer.components import sglang_payload

    # whole 128x128 blocks per projection, as SGLang's block-FP8 loader requires
    src = make_tiny_hf_model(tmp_path / "bf16", "qwen2", hidden_size=256, num_heads=2,
                             num_kv_heads=1, intermediate_size=256, num_layers=1)
    out = tmp_path / "fp8"
    assert main(["convert", "hf-to-block-fp8", "--hf-path", str(src), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        QUANTIZATION_CONFIG
    assert not (tmp_path / "fp8.partial").exists()
    assert main(["convert", "hf-to-block-fp8", "--hf-path", str(src), "--out", str(out)]) == 2

    def cfg(**sglang):
        return load_config(overrides=[f"policy.checkpoint={src}", "rollout.engine=sglang",
                                      *(f"rollout.sglang.{k}={v}" for k, v in sglang.items())])

    assert sglang_payload(cfg(), src, src) == "bf16"
    assert sglang_payload(cfg(model_path=out), src, out) == "fp8_block"
    with pytest.raises(UserError, match="does not re-quantise"):
        sglang_payload(cfg(quantization="fp8"), src, src)
