"""The streaming exporter over a live TP=2 x PP=2 model yields exactly the HF checkpoint the
model was loaded from (bit-identical), in buckets, in one order on every rank."""

from __future__ import annotations

import torch
from helpers import torchrun

from megatron_sppo.rollout.export import bucketed

BUCKET = 64 << 10


def test_export_tp2_pp2_bit_identical(zoo):
    dirs = [zoo["qwen2_gqa_untied"], zoo["llama_gqa_tied"]]
    results = torchrun("check_export.py", 4, "--tp", "2", "--pp", "2", "--bucket-bytes",
                       str(BUCKET), *map(str, dirs))
    assert len(results) == 4 * 2 * len(dirs)
    for hf in map(str, dirs):
        rows = [r for r in results if r["hf"] == hf]
        expected = rows[0]["expected"]
        for r in rows:
            assert not r["wrong"], r["wrong"]
            assert all(size <= BUCKET or count == 1 for size, count in r["bucket_sizes"])
            assert len(r["bucket_sizes"]) > 1
        gathered = [r for r in rows if r["gather"]]
        assert sorted(gathered[0]["names"]) == expected  # every tensor, once
        assert all(r["names"] == gathered[0]["names"] for r in gathered)  # one order
        own = {r["rank"]: r["names"] for r in rows if not r["gather"]}
        assert own[0] == own[1] and own[2] == own[3]  # TP ranks of a stage agree
        assert not set(own[0]) & set(own[2])  # stages are disjoint ...
        assert sorted(own[0] + own[2]) == expected  # ... and cover the model
        assert own[0] + own[2] == gathered[0]["names"]  # in HF order
        assert "model.layers.0.self_attn.q_proj.weight" in own[0]
        assert "model.layers.1.self_attn.q_proj.weight" in own[2]


def test_buckets_respect_the_size_and_keep_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 1, 50])]
    buckets = list(bucketed(named, bucket_bytes=100))  # float32: 40, 40, 120, 20, 4, 200 bytes
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]
