"""Token-budget micro-batches and row selection (pure functions)."""

import pytest
import torch

from megatron_sppo.data.batching import select_rows, token_budget_microbatches
from megatron_sppo.errors import UserError
from megatron_sppo.trainer.policy_update import PolicyBatch


def test_token_budget_microbatches():
    lengths = [5, 9, 3, 9, 4, 1]
    groups = token_budget_microbatches(lengths, 18)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 18
    assert groups[0] == [1, 3]  # longest first
    assert token_budget_microbatches(lengths, 9) == [[1], [3], [0], [4, 2], [5]]
    with pytest.raises(UserError, match="exceeds max_tokens_per_microbatch=8"):
        token_budget_microbatches(lengths, 8)


def test_select_rows_trims_to_the_longest_selected_row():
    ids = torch.arange(3 * 6).reshape(3, 6)
    per_token = torch.arange(3 * 5).reshape(3, 5).float()
    batch = PolicyBatch(ids, torch.tensor([6, 3, 4]), per_token > 0, per_token)
    mb = select_rows(batch, [2, 1], batch.lengths)
    assert mb.input_ids.tolist() == [[12, 13, 14, 15], [6, 7, 8, 9]]
    assert mb.old_logprobs.tolist() == [[10, 11, 12], [5, 6, 7]]
    assert mb.lengths.tolist() == [4, 3] and mb.advantages is None


def test_select_rows_pads_to_an_alignment_multiple():
    ids = torch.arange(1, 3 * 6 + 1).reshape(3, 6)
    per_token = torch.ones(3, 5)
    batch = PolicyBatch(ids, torch.tensor([6, 3, 4]), per_token, per_token)
    mb = select_rows(batch, [2, 1], batch.lengths, multiple=8)
    assert mb.input_ids.shape == (2, 8) and mb.old_logprobs.shape == (2, 7)
    assert mb.input_ids[0].tolist() == [13, 14, 15, 16, 17, 18, 0, 0]
    assert mb.old_logprobs[:, 5:].abs().sum() == 0 and mb.response_mask[:, :5].all()
    assert select_rows(batch, [1], batch.lengths, multiple=4).input_ids.shape == (1, 4)
