"""Tiny, randomly initialised Hugging Face models built entirely offline.

Tests and smoke runs need real HF checkpoints (config.json + safetensors +
tokenizer) of every supported family, but must never download anything. This
module fabricates them locally: a character-level tokenizer whose vocabulary is
small enough for a 64-wide model, and a random model per family whose weights
are deliberately non-degenerate so that a wrong HF <-> Megatron mapping
(swapped q/k, a lost bias, a norm read from the wrong layer) changes the logits.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"

# Every character math prompts and answers need (``\boxed{...}``, ``a^2``, ...).
ALPHABET = (string.digits + string.ascii_letters + " \n"
            + "+-*/=()[]{}<>.,:;!?'\"\\^_|$%&#~@")

# Qwen2's pre-tokenisation regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen's template minus tools/system defaults: the role header, the content, <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable-character table used by the ByteLevel pre-tokenizer/decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so decode(encode(text)) == text for any alphabet text.

    A character vocabulary keeps the embedding table tiny while still
    tokenising real math text. It is built as Qwen2's byte-level BPE pipeline
    (same normaliser, split regex, ByteLevel pre-tokenizer and decoder) with an
    empty merge list: every byte is its own token. The reason is that
    transformers 5 ignores ``tokenizer_class`` for ``model_type == "qwen2"``
    and rebuilds that pipeline around the saved vocab, so any other design
    would load back with different encodings from a qwen2 checkpoint.

    The vocabulary holds all 256 byte symbols (the brief's alphabet first, so
    its ids are small and stable); hence every UTF-8 text round-trips and
    ``<|unk|>`` exists but is never produced. Chat markers and
    ``<think>``/``</think>`` are added tokens, each a single id, as in Qwen.
    """
    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, IM_START, IM_END, UNK, THINK, END_THINK])}
    for b in [*ALPHABET.encode(), *range(256)]:
        vocab.setdefault(symbols[b], len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,  # would turn "a ," into "a,"
        model_max_length=1 << 20,
    )
    # Not special (like Qwen3): skip_special_tokens must keep the reasoning markers.
    tok.add_tokens([AddedToken(THINK, special=False, normalized=False),
                    AddedToken(END_THINK, special=False, normalized=False)])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _rope_parameters(rope_theta: float, rope_scaling: dict | None) -> dict:
    """transformers 5 keeps theta *inside* ``config.rope_parameters``, next to the scaling keys.

    There is no ``config.rope_theta`` attribute any more and ``rope_scaling`` is
    only a deprecated alias of ``rope_parameters``, so both are merged into one
    dict here. A legacy ``type`` key is renamed to ``rope_type``; the caller's
    dict is copied because the config mutates what it is given.
    """
    params = dict(rope_scaling or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params["rope_theta"] = float(rope_theta)
    return params


def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Give every weight a distinctive random value so mapping bugs are visible.

    HF init leaves norms at exactly 1 and biases at 0, which hides a swapped or
    dropped tensor. Here all parameters (Qwen2's q/k/v biases included) get
    N(0, 0.02) and RMSNorm weights (incl. Qwen3's q_norm/k_norm) get 1 + N(0, 0.1).
    A private generator makes the result depend on ``seed`` alone.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules()
                    if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None}
    with torch.no_grad():
        for _, p in model.named_parameters():  # tied embeddings are listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in norm_weights:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def build_tiny_hf_model(
    family: str = "qwen2",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 512,
) -> tuple[transformers.PreTrainedModel, PreTrainedTokenizerFast]:
    """In-memory version of :func:`make_tiny_hf_model`: returns ``(model, tokenizer)`` unsaved."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {TINY_FAMILIES}")
    config_cls, model_cls = _CONFIGS[family]
    tok = build_char_tokenizer()
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=_rope_parameters(rope_theta, rope_scaling),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        # Qwen convention: no BOS token, the config points bos at <|endoftext|>.
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
    )
    # Qwen2Config has no head_dim field (real Qwen2 configs omit it); Qwen3 defaults it to 128.
    if head_dim is not None or family != "qwen2":
        kwargs["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    if family == "mistral":
        kwargs["sliding_window"] = None
    elif family in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    config = config_cls(**kwargs)

    torch.manual_seed(seed)
    model = model_cls(config)
    _reinit_(model, seed)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        pad_token_id=tok.pad_token_id,
        # Chat turns end with <|im_end|>; plain completions with <|endoftext|>.
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.eos_token_id],
    )
    return model, tok


def make_tiny_hf_model(out_dir, family: str = "qwen2", **kwargs) -> Path:
    """Write a random ``family`` checkpoint (safetensors, tokenizer, generation config) to ``out_dir``.

    Keywords are those of :func:`build_tiny_hf_model`. Same arguments give bit-identical
    files, so tests can rebuild instead of caching.
    """
    model, tok = build_tiny_hf_model(family, **kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
