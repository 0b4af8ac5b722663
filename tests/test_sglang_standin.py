"""The faithful SGLang stand-in (tests/dist/fake_sglang, launched as the trainer launches SGLang:
one process per TP rank on the emulated accelerator) against an independent reference, a
transformers model of the same weights run in this process: SGLang's returned log-probs
(log_softmax(logits / T) over the whole vocabulary, before top-k/top-p), seeds honoured only
with --enable-deterministic-inference, finish reasons, n > 1 grouping, weight pushes over CUDA
IPC (one entry per server TP rank) and NCCL reaching every TP rank, the weight-update session,
pause/flush rules, released weights resumed without a push coming back as garbage, and the KV
pool sized from the GPU's free memory with SGLang's error when none is left."""

from __future__ import annotations

import sys
import threading

import pytest
import requests
import torch
from helpers import DIST, REPO, sglang_kv_tokens

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import EngineError, SamplingParams
from megatron_sppo.rollout.sglang_client import SGLangClient, SGLangHTTP
from megatron_sppo.rollout.sglang_engine import SGLangEngine
from megatron_sppo.rollout.sglang_launcher import LaunchOptions, SGLangServer
from megatron_sppo.rollout.sglang_weights import (BroadcastSync, serialize_for_ipc,
                                                   share_host_tensors_by_file,
                                                   weight_update_session)
from megatron_sppo.runtime.distributed import free_port

BUDGET = 32 << 20  # bytes of each emulated GPU
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
FAST = dict(max_retries=1, backoff_s=0.01, request_timeout_s=120)


def launch(tmp_path, model, *flags, tp=1, gpu=0, budget=BUDGET, name="server"):
    opts = LaunchOptions(model_path=str(model), python=sys.executable, port=free_port(),
                         tp_size=tp, base_gpu_id=gpu, mem_fraction_static=0.7, dtype="float32",
                         extra_args=flags)
    env = {"PYTHONPATH": f"{DIST / 'fake_sglang'}:{REPO}",
           "MEGATRON_SPPO_EMULATE_GPU_MEMORY": str(budget),
           "MEGATRON_SPPO_EMULATE_GPU_DIR": str(tmp_path / f"{name}-gpus")}
    return SGLangServer(opts.url, opts, log_path=tmp_path / f"{name}.log", env=env)


@pytest.fixture(scope="module")
def model_dir(zoo):
    return zoo["qwen2_gqa_untied"]


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tp2(model_dir, tmp_path_factory):
    """TP=2 on GPUs 2 and 3, memory saver on (no CPU backup), deterministic inference."""
    server = launch(tmp_path_factory.mktemp("tp2"), model_dir, "--enable-memory-saver",
                    "--enable-deterministic-inference", tp=2, gpu=2)
    server.start(timeout_s=600)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(model_dir, tmp_path_factory):
    """TP=1, no flags: seeds are SGLang's to ignore."""
    server = launch(tmp_path_factory.mktemp("plain"), model_dir)
    server.start(timeout_s=600)
    yield server
    server.stop()


def generate(server, prompts, **sampling) -> list[dict]:
    sampling = {"max_new_tokens": 8, **sampling}
    out = requests.post(server.url + "/generate", json={
        "input_ids": prompts, "sampling_params": [sampling] * len(prompts),
        "return_logprob": True, "logprob_start_len": -1}, timeout=300)
    assert out.status_code == 200, out.text
    return out.json()


def reference_logprobs(model, prompt, output, temperature=1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1), torch.tensor(output)


def assert_reference(model, prompts, outputs, temperature=1.0, tol=1e-5):
    for prompt, out in zip(prompts, outputs):
        logprobs, ids = reference_logprobs(model, prompt, out["output_ids"], temperature)
        got = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        assert (got - logprobs.gather(-1, ids[:, None]).squeeze(-1)).abs().max() <= tol


def perturbed(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
            for n, p in model.named_parameters()}


def test_sampler_logprobs_seeds_and_finish_reasons(tp2, reference):
    """Log-probs after temperature, before top-k/top-p, from both TP ranks' vocabulary
    slices; sampled tokens inside the filter; seeds repeat; stop token, length, greedy."""
    params = dict(temperature=0.7, top_k=20, top_p=0.9, sampling_seed=11)
    first = generate(tp2, PROMPTS, **params)
    assert_reference(reference, PROMPTS, first, temperature=0.7)
    for prompt, out in zip(PROMPTS, first):
        logprobs, ids = reference_logprobs(reference, prompt, out["output_ids"], 0.7)
        rank = (logprobs > logprobs.gather(-1, ids[:, None])).sum(-1)
        assert (rank < 20).all()  # top-k
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert [o["output_ids"] for o in generate(tp2, PROMPTS, **params)] == [
        o["output_ids"] for o in first]
    other = generate(tp2, PROMPTS, **{**params, "sampling_seed": 12})
    assert [o["output_ids"] for o in other] != [o["output_ids"] for o in first]

    stop = first[0]["output_ids"][3]
    (stopped,) = generate(tp2, PROMPTS[:1], **params, stop_token_ids=[stop])
    ends = first[0]["output_ids"].index(stop)
    assert stopped["output_ids"] == first[0]["output_ids"][:ends + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}

    greedy = generate(tp2, PROMPTS, temperature=0.0)
    assert_reference(reference, PROMPTS, greedy)
    for prompt, out in zip(PROMPTS, greedy):
        logprobs, ids = reference_logprobs(reference, prompt, out["output_ids"])
        assert torch.equal(logprobs.argmax(-1), ids)


def test_tensor_push_from_one_process_reaches_every_tp_rank(tp2, reference, model_dir):
    """sync='tensor' to a TP=2 server from one process: one entry per TP rank (a single
    entry leaves rank 1 without its payload and the server dies, as SGLang's would)."""
    from transformers import AutoModelForCausalLM

    engine = SGLangEngine([SGLangServer.attach(tp2.url)], sync="tensor", bucket_bytes=1 << 16,
                          **FAST)
    new = perturbed(reference)
    engine.update_weights(new.items(), version=3)
    pushed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pushed.load_state_dict(new)
    outputs = generate(tp2, PROMPTS, sampling_seed=1)
    assert_reference(pushed, PROMPTS, outputs)
    assert {o["meta_info"]["weight_version"] for o in outputs} == {"3"}
    assert engine.server_weight_versions() == ["3"]

    # load_format "direct": each rank copies its entry's (name, tensor) pairs by name
    share_host_tensors_by_file()
    endpoint, value = engine.client.endpoints[0], torch.linspace(-1, 1, 64)
    entries = [serialize_for_ipc([("model.norm.weight", value)]) for _ in range(2)]
    with weight_update_session([endpoint]):
        endpoint.call("/update_weights_from_tensor", {"serialized_named_tensors": entries,
                                                      "load_format": "direct"})
    got = endpoint.post("/get_weights_by_name", {"name": "model.norm.weight",
                                                 "truncate_size": 64})
    assert torch.equal(torch.tensor(got), value)
    engine.update_weights(reference.named_parameters(), version=4)  # back, for the next tests
    assert_reference(reference, PROMPTS, generate(tp2, PROMPTS, sampling_seed=1))


def test_session_pause_flush_and_memory_rules(tp2, reference):
    endpoint = SGLangHTTP(SGLangServer.attach(tp2.url), **FAST)
    with pytest.raises(EngineError, match="between begin_weight_update"):
        endpoint.call("/update_weights_from_tensor", {"serialized_named_tensors": [""],
                                                      "load_format": "flattened_bucket"})
    endpoint.call("/begin_weight_update", {})
    with pytest.raises(EngineError, match="already open"):
        endpoint.call("/begin_weight_update", {})
    endpoint.call("/end_weight_update", {})

    # a request paused in place stays in the running batch: no flush until it is gone
    done = []
    worker = threading.Thread(target=lambda: done.append(
        generate(tp2, PROMPTS[:1], max_new_tokens=400, ignore_eos=True, sampling_seed=2)))
    worker.start()
    while worker.is_alive() and requests.post(tp2.url + "/flush_cache",
                                              timeout=30).status_code == 200:
        pass  # admitted once a flush is refused
    endpoint.pause_generation("in_place")
    assert requests.post(tp2.url + "/flush_cache", timeout=30).status_code == 400
    endpoint.continue_generation()
    endpoint.abort_all()
    worker.join()
    (aborted,) = done[0]
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(aborted["output_ids"]) < 400
    endpoint.flush_cache()

    # weights released without --enable-weights-cpu-backup come back as garbage ...
    endpoint.pause_generation("retract")
    endpoint.release_memory()
    endpoint.resume_memory(None)
    endpoint.continue_generation()
    garbage = generate(tp2, PROMPTS, sampling_seed=1)
    with pytest.raises(AssertionError):
        assert_reference(reference, PROMPTS, garbage, tol=1e-2)
    # ... until weights are pushed
    engine = SGLangEngine([SGLangServer.attach(tp2.url)], sync="tensor", **FAST)
    engine.update_weights(reference.named_parameters(), version=5)
    assert_reference(reference, PROMPTS, generate(tp2, PROMPTS, sampling_seed=1))


def test_distributed_push_joins_every_tp_rank(tp2, reference, model_dir):
    """/init_weights_update_group: each TP rank joins as rank_offset + tp_rank (world 1 + 2);
    buckets broadcast from rank 0 land in both ranks' models."""
    from transformers import AutoModelForCausalLM

    endpoint = SGLangHTTP(SGLangServer.attach(tp2.url), **FAST)
    sync = BroadcastSync([endpoint], [2], master_address="127.0.0.1", master_port=free_port(),
                         backend="gloo", device="cpu", timeout_s=120)
    new = perturbed(reference)
    assert sync.push([list(new.items())[:5], list(new.items())[5:]], 6) == 2
    pushed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pushed.load_state_dict(new)
    assert_reference(pushed, PROMPTS, generate(tp2, PROMPTS, sampling_seed=1))
    assert endpoint.model_info()["weight_version"] == "6"
    sync.push([[(n, p.detach()) for n, p in reference.named_parameters()]], 7)
    sync.close()
    assert_reference(reference, PROMPTS, generate(tp2, PROMPTS, sampling_seed=1))


def test_kv_pool_sized_from_free_memory(tp2, reference, model_dir, tmp_path):
    """The KV pool from the GPU's free memory by SGLang's formula; a GPU without room for the
    pool refuses to start with SGLang's message."""
    info = requests.get(tp2.url + "/server_info", timeout=30).json()
    assert info["max_total_num_tokens"] == sglang_kv_tokens(reference, BUDGET, 2, 0.7)
    assert info["tp_size"] == 2
    loaded = sum(t.numel() * t.element_size()
                 for t in [*reference.parameters(), *reference.buffers()])
    starved = launch(tmp_path, model_dir, budget=loaded + (1 << 12), name="starved")
    with pytest.raises(EngineError, match="Loaded weights leave no GPU memory for the KV cache"):
        starved.start(timeout_s=600)


def test_seeds_ignored_and_parallel_n_without_deterministic_inference(plain, reference):
    params = dict(temperature=1.0, sampling_seed=11, max_new_tokens=16)
    first, again = generate(plain, PROMPTS, **params), generate(plain, PROMPTS, **params)
    assert [o["output_ids"] for o in first] != [o["output_ids"] for o in again]
    assert_reference(reference, PROMPTS, first)

    engine = SGLangEngine([SGLangServer.attach(plain.url)], n_mode="parallel", **FAST)
    assert engine.client.seeded is False  # read from /server_info
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=3, seed=4))
    for prompt, group in zip(PROMPTS, out):
        assert len({tuple(s.token_ids) for s in group}) == 3
        assert_reference(reference, [prompt] * 3, [
            {"output_ids": s.token_ids,
             "meta_info": {"output_token_logprobs": [[lp] for lp in s.logprobs]}}
            for s in group])
    seeded = SGLangClient([SGLangServer.attach(plain.url)], n_mode="parallel", seeded=True,
                          **FAST)
    with pytest.raises(UserError, match="deterministic"):
        seeded.generate(PROMPTS, SamplingParams(n=2))
