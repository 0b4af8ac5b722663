"""The strict CPU rehearsal (MEGATRON_SPPO_EMULATE_GPU=1): host and emulated device apart,
NCCL's rules on process groups, memory as the caching allocator reports it, CUDA IPC
between processes on one GPU, and the trainer's GPU paths under it.

Each check runs in a fresh interpreter: the layer patches torch for its whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import DIST, REPO, run, torchrun

from megatron_sppo.runtime.distributed import free_port

STRICT = {"MEGATRON_SPPO_EMULATE_GPU": "1"}
FAKE_SGLANG = DIST / "fake_sglang"


def results(proc) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]


def checks(name: str, *args, env=None) -> dict:
    proc = run([sys.executable, DIST / "emulated_checks.py", name, *args],
               env={**STRICT, **(env or {})}, timeout=120)
    return results(proc)[0]


def test_host_and_device_are_apart_as_on_cuda():
    r = checks("contract")
    # the contract, and CUDA's own error text
    assert "Expected all tensors to be on the same device" in r["mixed"]["error"]
    assert "cuda:0 and cpu" in r["mixed"]["error"]
    assert "aten.add.Tensor" in r["mixed"]["error"]  # the op that mixed devices
    assert "made_on_host() at" in r["mixed"]["error"]  # the function that made the tensor
    assert r["device"] == {"ok": [2.0, 2.0]}
    assert r["copied_back"] == {"ok": [2.0, 2.0]}
    # what CUDA allows: 0-dim host scalars, host index tensors, reading 0-dim values
    assert r["scalar"] == {"ok": [3.0, 3.0]}
    assert r["host_index"] == {"ok": [1.0, 3.0]}
    assert r["reads_0dim"] == {"ok": "cpu"}
    assert "cuda:0 and cuda:1" in r["other_gpu"]["error"]
    assert "Use Tensor.cpu()" in r["numpy"]["error"]
    assert r["type"] == "torch.cuda.FloatTensor" and r["is_cuda"] and r["available"]


def test_module_moves_keep_parameter_attributes_and_gradients_stay_on_device():
    r = checks("moves")
    assert r["weight"] == "cuda:0" and r["attr"] is True
    assert r["x_grad"] == "cuda:0" and r["w_grad"] == "cuda:0"
    assert r["host_grad"] == "cpu"  # .cuda() is differentiable back to the host
    assert r["offloaded"] == ["cpu", True]
    assert r["restored"] == ["cuda:0", True, True]
    assert r["hook_after_restore"]  # the same tensor: hooks on its grad accumulator survive


def test_memory_is_accounted_like_the_caching_allocator_and_seen_across_processes(tmp_path):
    mib = 1 << 20
    env = {**os.environ, **STRICT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "3",
           "MEGATRON_SPPO_EMULATE_GPU_MEMORY": str(64 * mib),
           "MEGATRON_SPPO_EMULATE_GPU_DIR": str(tmp_path)}
    cmd = [sys.executable, str(DIST / "emulated_checks.py"), "memory"]
    first = subprocess.Popen([*cmd, str(8 * mib)], env=env, cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = first.stdout.readline()
        a = json.loads(line[len("RESULT "):])
        assert a["allocated"] - a["start"] == 8 * mib
        assert a["resized_to_0"] == a["start"]  # megatron frees grad buffers this way
        assert a["reserved_after_resize"] >= 8 * mib  # the cache keeps it ...
        assert a["freed"] == a["start"] and a["reserved_after_free"] >= 8 * mib
        assert a["reserved_after_empty_cache"] == a["start"]  # ... until empty_cache()
        assert a["free_total"] == [64 * mib - a["start"] - 8 * mib, 64 * mib]
        # a second process on the same GPU sees the first one's memory; on another, not
        b = checks("memory", str(mib), env={k: env[k] for k in env if k.startswith(
            ("MEGATRON", "CUDA"))})
        assert b["free_total"][0] == 64 * mib - 8 * mib - mib - a["start"] - b["start"]
        c = checks("memory", str(mib), env={**{k: env[k] for k in env
                                              if k.startswith("MEGATRON")},
                                           "CUDA_VISIBLE_DEVICES": "4"})
        assert c["free_total"][0] == 64 * mib - mib - c["start"]
    finally:
        first.communicate("", timeout=60)


def test_cuda_ipc_shares_memory_on_one_gpu_and_fails_across_gpus():
    env = {**os.environ, **STRICT, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{FAKE_SGLANG}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def exchange(sender_gpus: str, receiver_gpus: str) -> tuple[dict, dict]:
        send = subprocess.Popen([sys.executable, str(DIST / "emulated_checks.py"), "ipc-send"],
                                env={**env, "CUDA_VISIBLE_DEVICES": sender_gpus}, cwd=REPO,
                                text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        payload = send.stdout.readline()
        recv = run([sys.executable, DIST / "emulated_checks.py", "ipc-recv"],
                   env={**env, "CUDA_VISIBLE_DEVICES": receiver_gpus}, timeout=120,
                   input=payload)
        out, _ = send.communicate("", timeout=60)
        return results(recv)[0], json.loads(out.split("RESULT ", 1)[1])

    # SGLang's TP rank 1 on GPU 5 (its cuda:1) opens the trainer's handle from GPU 5 (cuda:0)
    got, sender = exchange("5", "4,5")
    assert got == {"device": "cuda:1", "values": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}
    assert sender["after_receiver_wrote"] == [[7.0] * 3] * 2  # the same memory
    got, _ = exchange("5", "4")
    assert "is not visible" in got["error"]


@pytest.mark.parametrize("case", ["nccl", "mixed", "same_gpu"])
def test_process_groups_follow_nccl_rules(case):
    out = {r["rank"]: r for r in torchrun("emulated_groups.py", 2, case, env=STRICT)}
    if case == "same_gpu":  # two processes of one NCCL group on GPU 0
        for r in out.values():
            assert "Duplicate GPU detected" in r["device_all_reduce"], r
        return
    for r in out.values():
        assert r["device_all_reduce"] == "ok" and r["device_sum"] == [3.0, 3.0]
        assert r["broadcast_object"] == "ok" and r["object"] == {"from": 0}
    if case == "nccl":
        assert out[0]["backend"] == out[0]["subgroup_backend"] == "nccl"
        assert "No backend type associated with device type cpu" in out[0]["host_all_reduce"]
        assert "created by main() at" in out[0]["host_all_reduce"]
    else:
        assert out[0]["backend"] == out[0]["subgroup_backend"] == "cpu:gloo,cuda:nccl"
        assert out[0]["host_all_reduce"] == "ok"


def test_trainer_runs_under_the_strict_mode_like_on_the_relaxed_layer(zoo, tmp_path):
    """One rank, every phase, the critic with the distributed optimizer, a checkpoint and a
    resume: the same metrics as on the relaxed layer (host arithmetic either way). Catches
    a batch left on the host, a critic head on the host, host tensors in collectives of an
    NCCL-only default group."""
    from test_trainer_e2e import metrics, train_cmd, write_config

    config = write_config(tmp_path, zoo["qwen2_gqa_untied"],
                          trainer={"total_steps": 3, "save_interval": 2, "eval_interval": 0})
    extra = ["critic.use_distributed_optimizer=true"]
    run(train_cmd(config, tmp_path / "relaxed", *extra))
    strict = tmp_path / "strict"
    run(train_cmd(config, strict, *extra, "trainer.total_steps=2"), env=STRICT)
    run(train_cmd(config, strict, *extra, "--resume", "auto"), env=STRICT)
    want, got = metrics(tmp_path / "relaxed"), metrics(strict)
    assert sorted(got) == [1, 2, 3]
    for step, record in want.items():
        for key, value in record.items():
            if not key.startswith("time_") and key not in ("tokens_per_second",
                                                           "train_seconds"):
                assert got[step][key] == value, (step, key)
