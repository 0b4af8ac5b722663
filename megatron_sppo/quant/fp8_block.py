"""128x128 block FP8 weights: the DeepSeek-V3 / SGLang "block fp8" checkpoint form.

A linear weight W [out, in] becomes ``weight`` (float8_e4m3fn, same shape) and
``weight_scale_inv`` (float32, [ceil(out/128), ceil(in/128)]): per 128x128 block b,
``scale_inv[b] = amax(|W_b|) / 448`` and ``weight_b = round_e4m3(W_b / scale_inv[b])``, so that
``W_b ~= weight_b * scale_inv[b]`` (the name is the checkpoint format's: it multiplies on
dequantisation). Edge blocks of non-multiple-of-128 shapes cover what is there. config.json
announces the form with :data:`QUANTIZATION_CONFIG`.

Which layers: the linear projections q/k/v/o and gate/up/down. Embeddings, norms, biases and
lm_head stay in the model dtype; SGLang 0.5.23 quantises only ``LinearBase`` layers
(``Fp8Config.get_quant_method``), and lm_head/embeddings are not ones.

Why not push bf16 to an FP8 server: with ``--quantization fp8`` on a bf16 checkpoint SGLang
quantises once after loading (``Fp8LinearMethod.process_weights_after_loading`` replaces the
weight by a transposed fp8 tensor without its loader); tensors pushed later through
``update_weights_from_tensor`` / ``_from_distributed`` are loaded as they come, never
re-quantised. The exception is SGLang's ``--load-format flash_rl`` loader (Qwen2/Qwen3 only),
which records the original loaders and re-quantises reloads. So: launch from a block-FP8
checkpoint (:func:`write_block_fp8_checkpoint`) and push :func:`quantize_named_tensors`'
output, or do not quantise the server. :func:`sync_payload_format` decides and refuses the rest.

The quantiser is our own, not nvidia-modelopt's ``FP8QTensor`` (which gives the same bytes for
float32 input, see tests): it divides in float32 whatever the input dtype (modelopt divides in
the input dtype, so a bf16 weight is rounded twice), gives all-zero blocks a finite scale
(modelopt's 0/0 is NaN), and needs no 13-second import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from megatron_sppo.errors import UserError

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "weight_scale_inv"
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj")


def _blocks(rows: int, cols: int, block: int) -> tuple[int, int]:
    return math.ceil(rows / block), math.ceil(cols / block)


def quantize_block_fp8(weight: torch.Tensor, block: int = BLOCK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(out/block), ceil(in/block)]), on the
    weight's device. An all-zero block gets scale_inv 1 (any finite value reconstructs it)."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantises 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    nr, nc = _blocks(rows, cols, block)
    # zero padding to whole blocks changes no block's amax
    padded = F.pad(weight.detach().float(), (0, nc * block - cols, 0, nr * block - rows))
    tiles = padded.view(nr, block, nc, block)
    amax = tiles.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("weight has inf/NaN values: refusing to quantise it")
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # |W / scale_inv| <= 448 up to float rounding; clamp so nothing rounds past e4m3fn's max
    # (values beyond it become NaN, e4m3fn has no infinity)
    q = (tiles / scale_inv[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nr * block, nc * block)[:rows, :cols].contiguous(), scale_inv


def dequantize_block_fp8(qweight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``qweight * scale_inv`` per block, as ``dtype`` (the inverse of the quantiser)."""
    rows, cols = qweight.shape
    nr, nc = _blocks(rows, cols, block)
    if tuple(scale_inv.shape) != (nr, nc):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match "
                         f"{(nr, nc)} blocks of a {rows}x{cols} weight")
    full = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)
    return (qweight.float() * full[:, :cols]).to(dtype)


def is_quantized_weight(name: str) -> bool:
    """Whether an HF tensor name is a linear projection weight that block FP8 quantises."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_PROJECTIONS


def scale_name(weight_name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj.weight_scale_inv``."""
    return weight_name.removesuffix("weight") + SCALE_SUFFIX


def quantize_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                           block: int = BLOCK) -> Iterator[tuple[str, torch.Tensor]]:
    """The block-FP8 checkpoint's tensors for a stream of HF (name, tensor): each projection
    weight becomes (name, fp8) then (name_scale_inv, float32); everything else passes as is."""
    for name, tensor in named_tensors:
        if is_quantized_weight(name):
            qweight, scale_inv = quantize_block_fp8(tensor, block)
            yield name, qweight
            yield scale_name(name), scale_inv
        else:
            yield name, tensor


def is_block_fp8_config(hf_config: dict) -> bool:
    """Whether a config.json announces a 128x128 block-FP8 checkpoint."""
    q = hf_config.get("quantization_config") or {}
    return q.get("quant_method") == "fp8" and list(q.get("weight_block_size") or []) == [BLOCK,
                                                                                        BLOCK]


def block_fp8_config(hf_config: dict) -> dict:
    """A copy of config.json that announces the block-FP8 weights."""
    if hf_config.get("quantization_config"):
        raise UserError(f"the checkpoint is already quantised ({hf_config['quantization_config']})"
                        ": start from its bf16 original")
    return {**hf_config, "quantization_config": dict(QUANTIZATION_CONFIG)}


def sync_payload_format(quantization: str | None, server_hf_config: dict,
                        load_format: str | None = None) -> str:
    """What the trainer must push to a server launched with ``--quantization quantization``
    from a checkpoint with ``server_hf_config``: ``"bf16"`` or ``"fp8_block"`` (quantise with
    :func:`quantize_named_tensors`). Refuses the combinations whose weights SGLang would not
    re-quantise (see the module docstring)."""
    if is_block_fp8_config(server_hf_config):
        if quantization not in (None, "fp8"):
            raise UserError(f"rollout.sglang.quantization={quantization!r} with a block-FP8 "
                            "checkpoint: leave it unset (SGLang reads quantization_config)")
        return "fp8_block"
    if server_hf_config.get("quantization_config"):
        raise UserError(f"the SGLang checkpoint's quantization_config "
                        f"{server_hf_config['quantization_config']} is not 128x128 block FP8: "
                        "weight sync supports bf16 and block-FP8 servers only")
    if quantization is None:
        return "bf16"
    if quantization == "fp8" and load_format == "flash_rl":
        return "bf16"
    if quantization == "fp8":
        raise UserError(
            "rollout.sglang.quantization=fp8 on a bf16 checkpoint quantises once at load and "
            "SGLang does not re-quantise bf16 weights pushed later (update_weights_from_tensor/"
            "_distributed), so rollouts would not use the trained policy: launch SGLang from a "
            "block-FP8 checkpoint (quant.fp8_block.write_block_fp8_checkpoint) and push "
            "block-FP8 weights, or unset rollout.sglang.quantization")
    raise UserError(f"rollout.sglang.quantization={quantization!r} is not supported with weight "
                    "sync: use a block-FP8 checkpoint or no quantization")


def check_sglang_block_layout(arch, tp_size: int, block: int = BLOCK) -> None:
    """Refuse a model/TP pair SGLang's block-FP8 loader rejects at start-up
    (``Fp8LinearMethod.validate_block_quant_shapes``): every fused shard (q, k, v; gate, up)
    of a TP rank, and each row-parallel input (o, down) under TP > 1, must be whole blocks.
    ``arch`` is a :class:`megatron_sppo.models.hf_config.ModelArch`."""
    kv_heads = max(1, arch.num_kv_heads // tp_size)
    sizes = {"q_proj rows": arch.num_heads * arch.head_dim // tp_size,
             "k/v_proj rows": kv_heads * arch.head_dim,
             "gate/up_proj rows": arch.ffn_hidden_size // tp_size}
    if tp_size > 1:
        sizes["o_proj columns"] = arch.num_heads * arch.head_dim // tp_size
        sizes["down_proj columns"] = arch.ffn_hidden_size // tp_size
    for what, size in sizes.items():
        if size % block:
            raise UserError(f"block FP8 at sglang tp {tp_size}: {what} per rank = {size} is not a "
                            f"multiple of {block}; use another rollout.sglang.tp_size or a bf16 "
                            "server")


def write_block_fp8_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a block-FP8 copy of an HF checkpoint for SGLang to start from: quantised
    safetensors, the tokenizer/generation files, and config.json with its quantization_config.
    """
    from megatron_sppo.checkpoint.hf_io import (HFCheckpointReader, HFShardWriter,
                                                copy_non_weight_files)

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = block_fp8_config(json.loads((hf_dir / "config.json").read_text()))
    reader = HFCheckpointReader(hf_dir)
    writer = HFShardWriter(out_dir)
    stream = ((name, reader.get(name)) for name in sorted(reader.weight_map))
    for name, tensor in quantize_named_tensors(stream):
        writer.add(name, tensor)
    writer.close()
    copy_non_weight_files(hf_dir, out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
