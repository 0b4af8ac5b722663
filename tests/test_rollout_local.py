"""The local engine samples the model's distribution with SGLang's log-prob definition:
log-probs equal a teacher-forced HF forward, greedy equals transformers' argmax decoding,
seeded calls reproduce, stop ids/strings/EOS/length end responses, n samples are grouped."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import load_hf_tensors

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import SamplingParams
from megatron_sppo.rollout.local import LocalEngine, filter_top_k_top_p

PROMPTS = [[20, 21, 22, 23, 24, 25, 26], [30, 31, 32], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def hf_dir(zoo):
    return zoo["qwen2_gqa_untied"]


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(hf_dir):
    engine = LocalEngine(hf_dir, max_batch_size=4)  # 3 prompts x n=2 -> two chunks
    engine.update_weights(load_hf_tensors(hf_dir).items(), version=1)
    return engine


def _teacher_forced(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / scale, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=12, n=2, seed=3),
    SamplingParams(temperature=1.3, max_new_tokens=12, n=2, seed=4),
    SamplingParams(temperature=0.0, max_new_tokens=12, n=1),
], ids=["t0.7_topp_topk", "t1.3", "greedy"])
def test_logprobs_equal_teacher_forced_forward(engine, hf_model, params):
    out = engine.generate(PROMPTS, params)
    assert [len(group) for group in out] == [params.n] * len(PROMPTS)
    for prompt, group in zip(PROMPTS, out):
        for sample in group:
            assert len(sample.token_ids) == len(sample.logprobs) > 0
            expected = _teacher_forced(hf_model, prompt, sample.token_ids, params.temperature)
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, rtol=0, atol=1e-5)


def test_greedy_equals_transformers_argmax_decoding(engine, hf_model):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=16))
    eos = sorted(engine.eos_token_ids)
    for prompt, (sample,) in zip(PROMPTS, out):
        ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                eos_token_id=eos, pad_token_id=engine.pad_token_id)
        assert sample.token_ids == ref[0, len(prompt):].tolist()


def test_seeded_sampling_reproduces_independent_of_batching(engine, hf_dir):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=3, seed=7)
    first = engine.generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params) == first
    wide = LocalEngine(hf_dir, load_weights=True, max_batch_size=64)
    tokens = [s.token_ids for group in first for s in group]
    # other batching (one chunk instead of three): the same tokens, log-probs up to rounding
    assert [s.token_ids for group in wide.generate(PROMPTS, params) for s in group] == tokens
    assert len({tuple(t) for t in tokens}) == len(tokens)  # n samples differ from each other
    other = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, n=3,
                                                    seed=8))
    assert other != first


def test_stop_ids_strings_eos_and_length(engine):
    base = SamplingParams(temperature=1.0, max_new_tokens=24, seed=11)
    (free,), = engine.generate(PROMPTS[:1], base)
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    (cut,), = engine.generate(PROMPTS[:1], SamplingParams(
        temperature=1.0, max_new_tokens=24, seed=11, stop_token_ids=(stop_id,)))
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:first + 1]
    assert cut.logprobs == free.logprobs[:first + 1]
    # a stop string: two consecutive characters of the free response
    text = engine.tokenizer.decode(free.token_ids[8:10])
    (by_text,), = engine.generate(PROMPTS[:1], SamplingParams(
        temperature=1.0, max_new_tokens=24, seed=11, stop=(text,)))
    assert by_text.finish_reason == "stop"
    assert text in engine.tokenizer.decode(by_text.token_ids)
    assert text not in engine.tokenizer.decode(by_text.token_ids[:-1])
    assert text not in by_text.text  # the text stops before the stop string, as SGLang's
    # EOS from generation_config.json ends a response too
    engine.eos_token_ids.add(stop_id)
    try:
        (eos,), = engine.generate(PROMPTS[:1], base)
    finally:
        engine.eos_token_ids.discard(stop_id)
    assert eos.finish_reason == "stop" and eos.token_ids == cut.token_ids


def test_update_weights_changes_outputs_and_version(hf_dir, zoo):
    engine = LocalEngine(hf_dir)
    with pytest.raises(RuntimeError, match="never set"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
    engine.update_weights(load_hf_tensors(hf_dir).items(), version=3)
    assert engine.weight_version == 3
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = engine.generate(PROMPTS, greedy)
    other = load_hf_tensors(zoo["qwen2_mha_untied"])  # same shapes except k/v: skip those
    engine.update_weights(((n, t) for n, t in other.items() if "k_proj" not in n
                           and "v_proj" not in n), version=4)
    assert engine.weight_version == 4
    assert engine.generate(PROMPTS, greedy) != before
    with pytest.raises(ValueError, match="no weight named"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))], version=5)


def test_top_k_top_p_filter_matches_sglang_rule():
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64)
    kept, ids = filter_top_k_top_p(probs.clone(), top_k=-1, top_p=0.6)
    assert ids.tolist() == [[1, 2, 3, 0]] and kept.tolist() == [[0.4, 0.3, 0.0, 0.0]]
    kept, _ = filter_top_k_top_p(probs.clone(), top_k=1, top_p=1.0)
    assert kept.tolist() == [[0.4, 0.0, 0.0, 0.0]]


def test_bad_requests_are_user_errors(engine):
    with pytest.raises(UserError, match="outside"):
        engine.generate([[10**6]], SamplingParams())
    with pytest.raises(UserError, match="n=0"):
        engine.generate(PROMPTS, SamplingParams(n=0))
