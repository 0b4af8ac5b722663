"""The SGLang engine against stand-in servers that speak SGLang 0.5.23's HTTP protocol
(tests/dist/fake_sglang): outputs mapped back to prompts in order with nothing lost or
duplicated, retries, dead and slow servers, launcher command lines and process handling, and
both weight-sync transports end to end on CPU (CUDA IPC replaced by shared memory, NCCL by
gloo)."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time

import pytest
import torch
from helpers import DIST, REPO

from megatron_sppo.errors import UserError
from megatron_sppo.rollout import build_engine
from megatron_sppo.rollout.engine import EngineError, SamplingParams, sample_seed
from megatron_sppo.rollout.sglang_client import SGLangClient, SGLangHTTP
from megatron_sppo.rollout.sglang_engine import SGLangEngine
from megatron_sppo.rollout.sglang_launcher import (LaunchOptions, SGLangServer, replica_options,
                                                   server_command)
from megatron_sppo.rollout.sglang_weights import BroadcastSync, flatten_bucket
from megatron_sppo.runtime.distributed import free_port


def _load_fake():
    """The stand-in server module, under its own name: this process must not see an
    importable ``sglang``."""
    spec = importlib.util.spec_from_file_location(
        "fake_sglang_server", DIST / "fake_sglang" / "sglang" / "launch_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fake = _load_fake()
FakeSGLang, fake_logprob, fake_token, unflatten = (_fake.FakeSGLang, _fake.fake_logprob,
                                                   _fake.fake_token, _fake.unflatten)

PROMPTS = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
FAST = dict(max_retries=2, backoff_s=0.01, request_timeout_s=30)


@pytest.fixture()
def fakes():
    started = []

    def start(**behaviour):
        started.append(FakeSGLang(**behaviour).start())
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


def _client(*fakes, **options):
    return SGLangClient([SGLangServer.attach(f.url) for f in fakes], **{**FAST, **options})


def _expect(prompt, seed, length):
    return [fake_token(prompt, seed, t) for t in range(length)]


def test_duplicated_requests_map_back_in_order_across_replicas(fakes):
    a, b = fakes(), fakes()
    client = _client(a, b, batch_size=4, inflight_per_server=2)
    out = client.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=3, seed=9))
    assert [len(group) for group in out] == [3] * len(PROMPTS)
    for p, group in enumerate(out):
        for s, sample in enumerate(group):
            assert sample.token_ids == _expect(PROMPTS[p], sample_seed(9, p, s), 6)
            assert sample.logprobs == [fake_logprob(t) for t in sample.token_ids]
            assert sample.finish_reason == "length" and not sample.text == ""
    assert a.generate_calls and b.generate_calls  # both replicas served
    rids = a.rids_served + b.rids_served
    assert len(rids) == len(set(rids)) == 15  # each sample requested once


def test_parallel_n_output_j_belongs_to_prompt_j_div_n(fakes):
    """SGLang's n on servers that ignore seeds (no --enable-deterministic-inference): the
    trainer's seed is not sent, the n samples differ and come back grouped by prompt; servers
    honouring seeds would draw the n samples alike, so there it is refused."""
    fake = fakes()
    client = _client(fake, n_mode="parallel", batch_size=6, seeded=False)
    out = client.generate(PROMPTS, SamplingParams(max_new_tokens=4, n=3, seed=5))
    for p, group in enumerate(out):
        assert [s.token_ids for s in group] == [_expect(PROMPTS[p], k, 4) for k in range(3)]
    sent = [body["sampling_params"] for _, path, body in fake.requests if path == "/generate"]
    assert all(sp["n"] == 3 and "sampling_seed" not in sp for sp in sent)
    with pytest.raises(UserError, match="duplicate"):
        _client(fake, n_mode="parallel").generate(PROMPTS, SamplingParams(n=2))


def test_stop_token_ids_and_payload_fields(fakes):
    fake = fakes()
    stop = _expect(PROMPTS[0], sample_seed(0, 0, 0), 10)[3]
    (sample,), *_ = _client(fake).generate(PROMPTS, SamplingParams(
        max_new_tokens=10, seed=0, stop_token_ids=(stop,)))
    assert sample.finish_reason == "stop" and sample.token_ids[-1] == stop
    assert len(sample.token_ids) <= 4


def test_server_dying_mid_batch_loses_and_duplicates_nothing(fakes):
    dying, healthy = fakes(die_on_generate=1), fakes()
    client = _client(dying, healthy, batch_size=2, inflight_per_server=1)
    out = client.generate(PROMPTS, SamplingParams(max_new_tokens=5, n=2, seed=3))
    for p, group in enumerate(out):
        assert [s.token_ids for s in group] == [_expect(PROMPTS[p], sample_seed(3, p, s), 5)
                                                for s in range(2)]
    assert client.endpoints[0].dead and not client.endpoints[1].dead
    assert healthy.generate_calls == 5  # every chunk, the lost one included, exactly once


def test_transient_503_is_retried(fakes):
    fake = fakes(fail_503=2)
    out = _client(fake).generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, seed=1))
    assert out[0][0].token_ids == _expect(PROMPTS[0], sample_seed(1, 0, 0), 3)
    assert fake.generate_calls == 3


def test_all_servers_dead_fails_with_one_clear_error(fakes):
    client = _client(fakes(die_on_generate=1))
    with pytest.raises(EngineError, match="all SGLang servers failed"):
        client.generate(PROMPTS, SamplingParams(max_new_tokens=3))


def test_stragglers_are_aborted_at_the_deadline(fakes):
    slow = fakes(token_delay_s=0.02)
    start = time.monotonic()
    out = _client(slow, abort_after_s=0.3).generate(PROMPTS[:2], SamplingParams(
        max_new_tokens=1000))
    assert time.monotonic() - start < 10
    for (sample,) in out:
        assert sample.finish_reason == "abort" and sample.truncated
        assert 0 < len(sample.token_ids) < 1000 and len(sample.logprobs) == len(sample.token_ids)


# ---- weight sync -------------------------------------------------------------------------


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(7, 3, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(5, generator=g),  # fp32 after 21 bf16: aligned?
            "model.layers.0.mlp.up_proj.weight": torch.randn(3, 3, generator=g).bfloat16(),
            "lm_head.weight": torch.randn(7, 3, generator=g)}


def test_flattened_bucket_is_aligned_and_round_trips():
    weights = _weights()
    flat, meta = flatten_bucket(list(weights.items()))
    assert flat.dtype == torch.uint8 and flat.numel() == sum(m.numel for m in meta)
    for m in meta:
        assert m.start_idx % m.dtype.itemsize == 0 and m.end_idx - m.start_idx == m.numel
    back = unflatten(flat, [m.name for m in meta], [m.dtype for m in meta],
                     [m.shape for m in meta])
    for name, tensor in weights.items():
        assert torch.equal(back[name], tensor)


def test_colocated_tensor_sync_session_and_version(fakes):
    fake = fakes()
    engine = SGLangEngine([SGLangServer.attach(fake.url)], sync="tensor", bucket_bytes=64, **FAST)
    weights = _weights()
    engine.update_weights(weights.items(), version=5)
    for name, tensor in weights.items():
        assert torch.equal(fake.weights[name], tensor), name
    log = fake.log
    assert log[:2] == ["pause_generation", "begin_weight_update"]
    assert log[-3:] == ["end_weight_update", "flush_cache", "continue_generation"]
    assert log.count("update_weights_from_tensor") >= 2  # 64-byte buckets: several calls
    assert engine.weight_version == 5 and engine.server_weight_versions() == ["5"]
    engine.release_memory()
    assert fake.released == {"weights", "kv_cache", "cuda_graph"}
    engine.resume_memory(["weights"])
    assert fake.released == {"kv_cache", "cuda_graph"}
    assert engine.health()
    engine.shutdown()


def test_update_outside_a_session_is_refused(fakes):
    endpoint = SGLangHTTP(SGLangServer.attach(fakes().url))
    with pytest.raises(EngineError, match="begin_weight_update"):
        endpoint.call("/update_weights_from_tensor", {"serialized_named_tensors": [""],
                                                      "load_format": "flattened_bucket",
                                                      "flush_cache": False})


# ---- launcher and server processes -------------------------------------------------------


def _process(tmp_path, **behaviour) -> SGLangServer:
    opts = LaunchOptions(model_path="fake-model", python=sys.executable, port=free_port())
    env = {"PYTHONPATH": f"{DIST / 'fake_sglang'}:{REPO}", "FAKE_SGLANG": json.dumps(behaviour)}
    return SGLangServer(opts.url, opts, log_path=tmp_path / "server.log", env=env)


def test_server_command_lines():
    opts = LaunchOptions(model_path="/m", python="/opt/sglang-venv/bin/python", port=30010,
                         tp_size=2, base_gpu_id=4, mem_fraction_static=0.6,
                         enable_memory_saver=True, dtype="bfloat16", quantization="fp8",
                         random_seed=3, extra_args=("--log-level", "warning"))
    assert server_command(opts) == [
        "/opt/sglang-venv/bin/python", "-m", "sglang.launch_server", "--model-path", "/m",
        "--host", "127.0.0.1", "--port", "30010", "--tp-size", "2", "--dp-size", "1",
        "--base-gpu-id", "4", "--dtype", "bfloat16", "--mem-fraction-static", "0.6",
        "--enable-memory-saver", "--quantization", "fp8", "--random-seed", "3",
        "--log-level", "warning"]
    assert server_command(LaunchOptions(model_path="/m"))[-2:] == ["--dtype", "auto"]
    placed = replica_options(opts, 3)
    assert [(o.base_gpu_id, o.port) for o in placed] == [(4, 30010), (6, 30011), (8, 30012)]


def test_port_in_use_and_health_timeout(tmp_path):
    server = _process(tmp_path, healthy=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", server.options.port))
        busy.listen()
        with pytest.raises(UserError, match="already in use"):
            server.start()
    with pytest.raises(EngineError, match="not healthy after"):
        server.start(timeout_s=4)
    assert server.process is None  # stopped after the timeout


def test_launched_server_restarted_after_dying_mid_batch(tmp_path):
    server = _process(tmp_path, die_on_generate=1, die_marker=str(tmp_path / "died"))
    server.start(timeout_s=60)
    first_pid = server.process.pid
    try:
        client = SGLangClient([server], **FAST)
        out = client.generate(PROMPTS, SamplingParams(max_new_tokens=4, seed=2))
        assert [g[0].token_ids for g in out] == [_expect(p, sample_seed(2, i, 0), 4)
                                                 for i, p in enumerate(PROMPTS)]
        assert server.process.pid != first_pid and not client.endpoints[0].dead
    finally:
        server.stop()
    assert "--model-path" in (tmp_path / "server.log").read_text()


def test_distributed_sync_broadcasts_in_payload_order(tmp_path):
    server = _process(tmp_path)
    server.start(timeout_s=60)
    try:
        endpoint = SGLangHTTP(server, **FAST)
        sync = BroadcastSync([endpoint], [1], master_address="127.0.0.1",
                             master_port=free_port(), backend="gloo", device="cpu",
                             timeout_s=60)
        weights = _weights()
        assert sync.push([list(weights.items())[:2], list(weights.items())[2:]], 7) == 2
        for name, tensor in weights.items():
            got = endpoint.post("/get_weights_by_name", {"name": name, "truncate_size": 100})
            assert torch.equal(torch.tensor(got), tensor.float().flatten()), name
        assert endpoint.model_info()["weight_version"] == "7"
        sync.close()
    finally:
        server.stop()


def test_build_engine_kinds(zoo):
    assert type(build_engine("local", hf_path=zoo["qwen2_gqa_untied"])).__name__ == "LocalEngine"
    with pytest.raises(UserError, match="unknown rollout engine 'vllm'"):
        build_engine("vllm")
    with pytest.raises(UserError, match="model_path"):
        build_engine("sglang")


def test_fp8_block_payload_is_quantised_before_the_push(fakes):
    """A server started from a block-FP8 checkpoint receives e4m3 projection weights with
    their weight_scale_inv, everything else as sent."""
    from megatron_sppo.quant.fp8_block import dequantize_block_fp8, scale_name

    fake = fakes()
    engine = SGLangEngine([SGLangServer.attach(fake.url)], sync="tensor", bucket_bytes=256,
                          payload="fp8_block", **FAST)
    weights = _weights()
    engine.update_weights(weights.items(), version=1)
    proj = "model.layers.0.mlp.up_proj.weight"
    assert fake.weights[proj].dtype == torch.float8_e4m3fn
    deq = dequantize_block_fp8(fake.weights[proj], fake.weights[scale_name(proj)],
                               dtype=torch.float32)
    original = weights[proj].float()
    assert ((deq - original).abs() <= original.abs() / 16 + 1e-6).all()
    for name in set(weights) - {proj}:
        assert torch.equal(fake.weights[name], weights[name]), name
    engine.shutdown()
    with pytest.raises(UserError, match="payload='int4'"):
        SGLangEngine([SGLangServer.attach(fake.url)], sync="tensor", payload="int4", **FAST)


def test_requests_match_the_pinned_sglang_definitions(fakes):
    """Every request the engine sends (generate in both n modes, tensor weight sync, memory,
    abort) against SGLang's own route and request definitions, extracted from the pinned
    wheel by tools/extract_sglang_protocol.py; the pin is the Dockerfile's."""
    import dataclasses
    import re

    fixture = json.loads((REPO / "tests" / "fixtures" / "sglang_protocol.json").read_text())
    pinned = re.search(r"ARG SGLANG_VERSION=(\S+)", (REPO / "Dockerfile").read_text()).group(1)
    assert fixture["sglang_version"] == pinned, "re-run tools/extract_sglang_protocol.py"

    fake = fakes()
    params = SamplingParams(max_new_tokens=3, n=2, temperature=0.7, top_p=0.9, top_k=5,
                            stop=("x",), stop_token_ids=(3,), seed=1)
    _client(fake, n_mode="parallel", seeded=False).generate(PROMPTS[:2], params)
    _client(fake).generate(PROMPTS[:2], params)
    engine = SGLangEngine([SGLangServer.attach(fake.url)], sync="tensor", bucket_bytes=64, **FAST)
    engine.update_weights(_weights().items(), version=2)
    engine.release_memory()
    engine.resume_memory(["weights"])
    engine.client.live[0].abort_all()
    engine.shutdown()

    paths = set()
    for method, path, body in fake.requests:
        route = fixture["routes"].get(path)
        assert route is not None and method in route["methods"], (method, path)
        paths.add(path)
        if route["request"] and body:
            fields = fixture["requests"][route["request"]]
            assert set(body) <= set(fields), (path, set(body) - set(fields))
        if path == "/generate":
            sampling = body["sampling_params"]
            for one in sampling if isinstance(sampling, list) else [sampling]:
                assert set(one) <= set(fixture["sampling_params"]), set(one)
    assert {"/generate", "/update_weights_from_tensor", "/begin_weight_update",
            "/end_weight_update", "/pause_generation", "/continue_generation", "/flush_cache",
            "/release_memory_occupation", "/resume_memory_occupation", "/abort_request"} <= paths


def test_weight_broadcast_master_address():
    """Servers given by address (their own nodes) reach rank 0 by its host name; servers the
    trainer launched are local; an explicit address wins."""
    from megatron_sppo.config import load_config
    from megatron_sppo.trainer.components import sync_master_address

    base = ["policy.checkpoint=hf", "rollout.engine=sglang"]
    assert sync_master_address(load_config(overrides=base)) == "127.0.0.1"
    remote = [*base, "rollout.sglang.addresses=http://node7:30000"]
    assert sync_master_address(load_config(overrides=remote)) == socket.getfqdn()
    explicit = [*remote, "rollout.sglang.sync_master_address=10.0.0.5"]
    assert sync_master_address(load_config(overrides=explicit)) == "10.0.0.5"


def test_protocol_extraction_reads_routes_and_inherited_fields():
    """tools/extract_sglang_protocol.py on a hand-written source in SGLang's style."""
    import ast
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "extract", REPO / "tools" / "extract_sglang_protocol.py")
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    io_struct = ast.parse(
        "class BaseReq(msgspec.Struct):\n    rid: Optional[str] = None\n"
        "class FooReqInput(BaseReq, kw_only=True):\n    tags: list = None\n    n: int\n")
    assert extract.class_fields(io_struct)["FooReqInput"] == {"rid": "None", "tags": "None",
                                                               "n": None}
    server = ast.parse(
        "@app.api_route('/foo', methods=['GET', 'POST'])\n"
        "async def foo(obj: Annotated[FooReqInput, Body()], request: Request): ...\n"
        "@app.get('/health')\nasync def health(): ...\n")
    assert extract.routes(server) == {"/foo": {"methods": ["GET", "POST"],
                                               "request": "FooReqInput"},
                                      "/health": {"methods": ["GET"], "request": None}}


def test_stack_check_refuses_what_the_transport_cannot_bridge():
    """The two torch stacks: CUDA IPC needs the same rebuild_cuda_tensor arguments, the NCCL
    broadcast the same NCCL; each transport is refused only for its own mismatch."""
    from megatron_sppo.rollout.sglang_stack import check_stacks, torch_stack

    trainer = torch_stack()
    assert trainer["rebuild_cuda_tensor"][6] == "storage_device"  # what SGLang patches
    check_stacks(trainer, dict(trainer), "tensor")
    check_stacks(trainer, dict(trainer), "distributed")
    older = {**trainer, "rebuild_cuda_tensor": trainer["rebuild_cuda_tensor"][:-1]}
    with pytest.raises(UserError, match="rebuild_cuda_tensor"):
        check_stacks(trainer, older, "tensor")
    check_stacks(trainer, older, "distributed")
    other_nccl = {**trainer, "nccl": "2.21.5", "torch": "2.9.0"}
    with pytest.raises(UserError, match="NCCL .* and 2.21.5"):
        check_stacks(trainer, other_nccl, "distributed")
    check_stacks(trainer, other_nccl, "tensor")
