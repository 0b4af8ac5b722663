"""One SPPO policy update inside megatron-core (schedule, DDP, optimizer with clipping) gives
the same loss, grad norm and updated weights at TP=1, TP=2, PP=2, TP2xPP2 and DP=2, for
two different micro-batchings and with micro-batch widths padded to FP8's 16-token alignment; the loss equals the same PPO loss on HF transformers' log-probs."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from helpers import DIST, load_hf_tensors, torchrun

from megatron_sppo.algorithms import PolicyLossConfig, policy_loss

sys.path.insert(0, str(DIST))

LAYOUTS = {  # name -> (ranks, flags)
    "tp1_budget16": (1, ("--max-tokens", "16")),
    "tp1_align16": (1, ("--align", "16")),  # FP8 token alignment: padding changes nothing
    "tp2": (2, ("--tp", "2")),
    "pp2": (2, ("--pp", "2")),
    "dp2": (2, ()),
    "tp2pp2": (4, ("--tp", "2", "--pp", "2")),
}


def hf_reference_loss(hf_dir):
    from ppo_step import TEMPERATURE, synthetic_rollouts

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids, lengths, mask, advantages, noise = synthetic_rollouts(model.config.vocab_size)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1] / TEMPERATURE, -1)
    taken = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return policy_loss(taken, taken + noise, advantages, mask, PolicyLossConfig()).loss.item()


@pytest.fixture(scope="module")
def baseline(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "tp1"
    (result,) = torchrun("ppo_step.py", 1, zoo["qwen2_gqa_untied"], "--out", out)
    return result, out


def _weights(out, tmp_path):
    from megatron_sppo.checkpoint.convert import megatron_to_hf

    megatron_to_hf(out, tmp_path / "hf", show_progress=False)
    return load_hf_tensors(tmp_path / "hf")


def test_loss_matches_hf_transformers(zoo, baseline):
    result, _ = baseline
    assert result["ok"] and result["microbatches"] > 1
    assert result["loss"] == pytest.approx(hf_reference_loss(zoo["qwen2_gqa_untied"]), abs=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_microbatchings_agree(zoo, baseline, tmp_path, layout):
    nproc, flags = LAYOUTS[layout]
    out = tmp_path / layout
    results = torchrun("ppo_step.py", nproc, zoo["qwen2_gqa_untied"], "--out", out, *flags)
    base, base_out = baseline
    assert results
    for r in results:
        assert r["tokens"] == base["tokens"]
        assert r["loss"] == pytest.approx(base["loss"], abs=1e-6)
        assert r["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
    ours, ref = _weights(out, tmp_path / "a"), _weights(base_out, tmp_path / "b")
    original = load_hf_tensors(zoo["qwen2_gqa_untied"])
    for name, value in ref.items():
        # Adam's first step moves by ~lr*sign(g); allow 1% of one step for float order
        assert (ours[name] - value).abs().max().item() < 1e-5, name
        assert not torch.equal(value, original[name]), f"{name} was not updated"
