"""Megatron GPTModel built from HF configs reproduces HF transformers logits at TP=1, TP=2,
PP=2 and TP2xPP2 (torchrun + gloo), from HF weights and from dist checkpoints resharded
across TP/PP."""

from __future__ import annotations


import pytest
from helpers import torchrun

TOL = 1e-4


def _check(results, names, zoo):
    by_dir = {}
    for r in results:
        if "max_diff" in r:
            by_dir.setdefault(r["hf"], []).append(r)
    for name in names:
        rows = by_dir.get(str(zoo[name]))
        assert rows, f"no logits reported for {name}"
        for r in rows:
            assert r["max_diff"] <= TOL, (name, r)
            assert r["padded_logits_zero"], (name, r)


def test_logits_match_hf_tp1(zoo):
    results = torchrun("check_logits.py", 1, *zoo.values())
    _check(results, zoo, zoo)


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")], ids=["tp2", "pp2"])
def test_logits_match_hf_two_ranks(zoo, layout):
    results = torchrun("check_logits.py", 2, *layout, *zoo.values())
    _check(results, zoo, zoo)


def test_saved_tp2_by_two_ranks_loads_at_pp2_and_tp2pp2(zoo, tmp_path):
    """Two real ranks write TP=2; the checkpoint reloads at TP1xPP2 and TP2xPP2 with the
    same logits as HF, and each TP2xPP2 rank holds about a quarter of the parameters."""
    name = "qwen2_gqa_untied"
    out = tmp_path / "mg_tp2"
    torchrun("-m megatron_sppo", 2, "convert", "hf-to-megatron", "--hf-path", zoo[name],
             "--megatron-path", out, "--tp", "2", "--no-progress")
    meta = (out / "iter_0000000" / "megatron_sppo.json").read_text()
    assert '"saved_tp": 2' in meta
    results = torchrun("check_logits.py", 2, "--pp", "2", "--megatron", out, zoo[name])
    _check(results, [name], zoo)
    results = torchrun("check_logits.py", 4, "--tp", "2", "--pp", "2", "--megatron", out,
                       zoo[name])
    _check(results, [name], zoo)
    assert len(results) == 4
    for r in results:
        share = r["local_params"] / r["total_params"]
        assert 0.2 <= share <= 0.3, r
