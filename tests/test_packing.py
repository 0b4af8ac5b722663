"""Packed (THD) micro-batches on CPU: the pack/unpack arithmetic, megatron-core's
PackedSeqParams for a plan, per-sequence causal attention over a pack (as TE computes it from
cu_seqlens_padded) equal to attention over the padded rows, and the schedule's packed path
giving the padded path's losses with a model that honours the THD parameters."""

from __future__ import annotations

import pytest
import torch

from megatron_sppo.data.packing import (SequenceLayout, pack, packed_seq_params, plan_packing,
                                        unpack)

LENGTHS = [5, 2, 7]


def test_plan_offsets_and_layout():
    plan = plan_packing(LENGTHS, 4)
    assert plan.padded == (8, 4, 8) and plan.offsets == (0, 8, 12, 20) and plan.total == 20
    assert plan_packing(LENGTHS).total == sum(LENGTHS)
    assert (SequenceLayout(16, packed=True).row_multiple, SequenceLayout(16).row_multiple) == (1, 16)
    assert (SequenceLayout(16, packed=True).pack_align, SequenceLayout(16).pack_align) == (16, None)


def test_pack_unpack_round_trip_and_gradient():
    x = torch.randn(3, 7, 2)
    plan = plan_packing(LENGTHS, 4)
    packed = pack(x, plan)
    assert packed.shape == (1, 20, 2)
    assert torch.equal(packed[0, 8:10], x[1, :2]) and packed[0, 10:12].abs().sum() == 0
    y = packed.clone().requires_grad_(True)
    back = unpack(y, plan, 7)
    for i, n in enumerate(LENGTHS):
        assert torch.equal(back[i, :n], x[i, :n]) and back[i, n:].abs().sum() == 0
    back.sum().backward()
    assert y.grad[0].sum(-1).tolist() == [2.0 if k in (0, 1, 2, 3, 4, 8, 9, 12, 13, 14, 15, 16,
                                                        17, 18) else 0.0 for k in range(20)]


def test_packed_seq_params_fields():
    psp = packed_seq_params(plan_packing(LENGTHS, 4))
    assert psp.qkv_format == "thd"
    assert psp.cu_seqlens_q.tolist() == [0, 5, 7, 14] and psp.cu_seqlens_q.dtype == torch.int32
    assert psp.cu_seqlens_q_padded.tolist() == [0, 8, 12, 20]
    assert psp.cu_seqlens_kv.tolist() == psp.cu_seqlens_q.tolist()
    assert psp.max_seqlen_q == psp.max_seqlen_kv == 8


def thd_attention(q, k, v, psp):
    """Per-sequence causal attention over a pack [T, H], the way TE's THD kernels read
    cu_seqlens (real tokens) and cu_seqlens_padded (where each sequence starts)."""
    out = torch.zeros_like(q)
    for i in range(len(psp.cu_seqlens_q) - 1):
        start = int(psp.cu_seqlens_q_padded[i])
        n = int(psp.cu_seqlens_q[i + 1] - psp.cu_seqlens_q[i])
        s = slice(start, start + n)
        out[s] = torch.nn.functional.scaled_dot_product_attention(
            q[None, s], k[None, s], v[None, s], is_causal=True)[0]
    return out


def test_thd_attention_over_the_pack_equals_padded_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 3, 7, 4).unbind(0)  # [b, s, h] each
    plan = plan_packing(LENGTHS, 4)
    packed = [pack(t, plan)[0] for t in (q, k, v)]
    got = unpack(thd_attention(*packed, packed_seq_params(plan))[None], plan, 7)
    for i, n in enumerate(LENGTHS):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n], is_causal=True)[0]
        assert torch.allclose(got[i, :n], want, atol=1e-6)


class PrefixMeanModel(torch.nn.Module):
    """A stand-in for GPTModel that honours THD packing like TE: each position sees the mean
    of its own sequence's embeddings up to itself (padded rows: its row's)."""

    def __init__(self):
        super().__init__()
        from megatron.core.enums import ModelType
        from megatron.core.transformer import TransformerConfig

        self.config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                                        calculate_per_token_loss=True)
        self.model_type = ModelType.encoder_or_decoder
        self.embed = torch.nn.Embedding(32, 4)
        self.head = torch.nn.Linear(4, 5)

    def set_input_tensor(self, tensor):  # the schedule's pipeline hook (one stage here)
        assert tensor is None or tensor == [None]

    def forward(self, ids, position_ids, attention_mask, packed_seq_params=None):
        h = self.embed(ids)[0] if packed_seq_params else self.embed(ids)
        if packed_seq_params is None:
            steps = torch.arange(1, ids.shape[1] + 1)[None, :, None]
            return self.head(h.cumsum(1) / steps)
        out = torch.zeros_like(h)
        cu, starts = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded
        for i in range(len(cu) - 1):
            s = slice(int(starts[i]), int(starts[i]) + int(cu[i + 1] - cu[i]))
            out[s] = h[s].cumsum(0) / torch.arange(1, s.stop - s.start + 1)[:, None]
            assert torch.equal(position_ids[0, s], torch.arange(s.stop - s.start))
        return self.head(out)[None]


def test_schedule_packed_path_equals_padded_path(megatron_tp1):
    from megatron_sppo.trainer.schedule import run_microbatches

    torch.manual_seed(0)
    model = PrefixMeanModel()
    lengths = torch.tensor(LENGTHS)
    ids = torch.randint(1, 32, (3, 7)) * (torch.arange(7)[None] < lengths[:, None])
    mask = (torch.arange(7)[None] < lengths[:, None]).float()

    def loss(output, item):
        assert output.shape == (3, 7, 5)
        per_token = output.logsumexp(-1) * item
        return per_token.sum(), item.sum(), {"out": output.detach()}

    results = {}
    for align in (None, 4):
        model.zero_grad()
        (r,) = run_microbatches(model, [(ids, lengths, mask)], loss, pack_align=align)
        results[align] = (r, [p.grad.clone() for p in model.parameters()])
    (padded, g1), (packed, g2) = results[None], results[4]
    assert torch.allclose(padded["out"] * mask[..., None], packed["out"], atol=1e-6)
    assert float(padded["loss_sum"]) == pytest.approx(float(packed["loss_sum"]), abs=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)
