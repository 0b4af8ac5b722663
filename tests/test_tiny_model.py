"""Tiny offline HF checkpoints: every later conversion/trainer test builds on these."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_sppo.models.tiny import (
    CHAT_TEMPLATE,
    TINY_FAMILIES,
    build_char_tokenizer,
    build_tiny_hf_model,
    make_tiny_hf_model,
)

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "make_tiny_model.py"

SAMPLES = [
    "What is 12+35? \\boxed{47}",
    "Solve: (x^2 - 4)/[x+2] = 3; x != -2.\n\nAnswer: $x = 5$ & 'done' \"ok\" #1 ~@|%_",
    "  leading and trailing spaces  \n\n",
    "<think>12+35 = 47</think>\nSo the answer is \\boxed{47}.<|im_end|>",
]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _check_tokenizer(t, ref):
    assert len(t) == len(ref)
    assert (t.pad_token, t.eos_token, t.unk_token) == ("<|pad|>", "<|endoftext|>", "<|unk|>")
    assert t.padding_side == "right"
    for text in SAMPLES:
        ids = t.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert t.decode(ids) == text
    for marker in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        ids = t.encode(marker, add_special_tokens=False)
        assert ids == [t.convert_tokens_to_ids(marker)]
    msgs = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]
    assert t.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n")
    assert t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")


def test_char_tokenizer(tok):
    _check_tokenizer(tok, tok)
    assert len(tok("a b\n").input_ids) == 4  # one id per character, spaces/newlines included
    text = "<think>x</think>y<|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "<think>x</think>y"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_reload_identical(family, tmp_path, tok):
    out = make_tiny_hf_model(tmp_path / family, family, seed=3)
    model, _ = build_tiny_hf_model(family, seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(model)

    cfg = loaded.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    # Qwen2Config has no head_dim field (real Qwen2 configs omit it); the others store it.
    assert (cfg.head_dim if family != "qwen2" else cfg.hidden_size // cfg.num_attention_heads) == 16
    assert cfg.rms_norm_eps == 1e-6 and cfg.attention_dropout == 0.0
    assert getattr(cfg, "sliding_window", None) is None
    assert cfg.rope_parameters["rope_theta"] == 10000.0

    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    norms = [v for k, v in sd.items() if "norm" in k]
    assert norms and all(not torch.all(v == 1) for v in norms)
    if family == "qwen2":
        biases = [v for k, v in sd.items() if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
        assert len(biases) == 6 and all(v.abs().sum() > 0 for v in biases)

    ids = torch.tensor([tok.encode(SAMPLES[0] + SAMPLES[3])])
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    _check_tokenizer(AutoTokenizer.from_pretrained(out), tok)  # qwen2 loads as Qwen2Tokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_deterministic():
    a, _ = build_tiny_hf_model("qwen3", seed=0)
    b, _ = build_tiny_hf_model("qwen3", seed=0)
    c, _ = build_tiny_hf_model("qwen3", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in sa if "rotary" not in k)


def test_variants(tmp_path):
    """Tied embeddings, bf16, explicit head_dim and llama3 rope scaling survive a save/reload."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    out = make_tiny_hf_model(tmp_path / "l", "llama", tie_word_embeddings=True, dtype=torch.bfloat16,
                             head_dim=32, rope_theta=500000.0, rope_scaling=dict(scaling),
                             max_position_embeddings=16384)
    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_parameters"] == {**scaling, "rope_theta": 500000.0}
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.head_dim == 32
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.dtype == torch.bfloat16
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)


def test_cli_refuses_existing_dir(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = subprocess.run([sys.executable, str(CLI), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_overwrite(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_model", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["--out", str(out), "--family", "mistral", "--overwrite", "--layers", "1"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir left behind
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 1
