"""`megatron-sppo train` end to end on the strict emulated accelerator (MEGATRON_SPPO_EMULATE_GPU=1)
with the faithful SGLang stand-in: policy TP=2 x PP=2 beside the critic at TP=1 x PP=2 on four
ranks, PPO-GAE with a critic warm-up step. First colocated (a TP=2 server on the trainer's GPUs
0 and 1, memory saver on, weights over CUDA IPC with one entry per server TP rank from the
trainer rank on that GPU); then resumed from its checkpoint with the server on GPUs 4 and 5
(weights over the NCCL broadcast). After every step the server's log-probs of the sampled
tokens equal Megatron's (fp32), which holds only if every sync reached every server rank and
no step generated from released weights; the server sized its KV cache against free GPUs
(launched before Megatron allocated). And a start-up check: SGLang's torch stack with another
NCCL than the trainer's is refused in one line before a server starts."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from helpers import DIST, REPO, run, sglang_kv_tokens
from test_trainer_e2e import metrics, train_cmd, write_config

from megatron_sppo.runtime.distributed import free_port

BUDGET = 32 << 20  # bytes of each emulated GPU
LAYOUT = ["policy.tensor_model_parallel_size=2", "policy.pipeline_model_parallel_size=2",
          "critic.tensor_model_parallel_size=1", "critic.pipeline_model_parallel_size=2"]


def sglang_section(**extra) -> dict:
    return {"python": sys.executable, "tp_size": 2, "dtype": "float32",
            "mem_fraction_static": 0.7, "enable_memory_saver": True, "port": free_port(),
            "sync_master_port": free_port(), "startup_timeout_s": 600, **extra}


def strict_env(gpus) -> dict:
    return {"MEGATRON_SPPO_EMULATE_GPU": "1", "MEGATRON_SPPO_EMULATE_GPU_MEMORY": str(BUDGET),
            # one node: every rank and server process of a run accounts on the same GPUs
            "MEGATRON_SPPO_EMULATE_GPU_DIR": str(gpus),
            "PYTHONPATH": os.pathsep.join([str(DIST / "fake_sglang"), str(REPO)])}


@pytest.fixture(scope="module")
def colocated_run(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strict")
    config = write_config(
        tmp, zoo["qwen2_gqa_untied"],
        # every response is truncated and answer-less: -1 each, so critic and policy learn
        algorithm={"estimator": "gae", "truncated_reward": None}, reward={"no_answer": -1.0},
        critic={"warmup_steps": 1},
        rollout={"engine": "sglang", "sglang": sglang_section(colocated=True, base_gpu_id=0)},
        data={"eval_files": []},
        trainer={"total_steps": 2, "save_interval": 2, "eval_interval": 0})
    out = tmp / "run"
    run(train_cmd(config, out, *LAYOUT, nproc=4), timeout=1200, env=strict_env(tmp / "gpus"))
    return tmp, config, out


def assert_synced(record: dict) -> None:
    assert record["logprob_mismatch_mean"] <= 1e-5, record["step"]
    assert record["logprob_mismatch_max"] <= 1e-4, record["step"]


def test_colocated_warm_up_and_kv_sizing(colocated_run, zoo):
    """Step 1 is the critic's warm-up (no sync: the server keeps its weights), step 2 syncs
    over CUDA IPC; the server sized its KV pool against GPUs nothing else held."""
    from transformers import AutoModelForCausalLM

    _, _, out = colocated_run
    m = metrics(out)
    assert sorted(m) == [1, 2] and "policy_loss" not in m[1]
    assert m[1]["critic_grad_norm"] > 0 and m[2]["grad_norm"] > 0  # the weights move
    for record in m.values():
        assert_synced(record)
    log = (out / "sglang_logs" / "sglang_0.log").read_text()
    assert "--enable-memory-saver" in log
    reference = AutoModelForCausalLM.from_pretrained(zoo["qwen2_gqa_untied"],
                                                     dtype=torch.float32)
    launched = int(re.search(r"max_total_num_tokens=(\d+)", log).group(1))
    assert launched == sglang_kv_tokens(reference, BUDGET, 2, 0.7)


def test_resumed_with_the_server_on_its_own_gpus(colocated_run):
    """The checkpoint of the colocated run resumed with the server on GPUs 4-5: the weights
    reach it over the NCCL broadcast (trainer rank 0 on GPU 0 + the server's two ranks)."""
    tmp, config, out = colocated_run
    section = sglang_section(colocated=False, base_gpu_id=4)
    overrides = [f"rollout.sglang.{k}={v}" for k, v in section.items()]
    run(train_cmd(config, out, *LAYOUT, *overrides, "trainer.total_steps=3", "--resume", "auto",
                  nproc=4), timeout=1200, env=strict_env(tmp / "gpus-resumed"))
    m = metrics(out)
    assert sorted(m) == [1, 2, 3] and m[3]["grad_norm"] > 0
    assert_synced(m[3])
    argv = [json.loads(line)["argv"] for line in (out / "sglang_logs" / "sglang_0.log")
            .read_text().splitlines() if line.startswith('{"argv"')][-1]
    assert argv[argv.index("--base-gpu-id") + 1] == "4"


def test_startup_refuses_another_nccl_in_the_sglang_stack(zoo, tmp_path):
    """rollout.sglang.python's torch loads another NCCL than the trainer's: refused before a
    server starts, in one line naming both versions."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch.cuda.nccl\ntorch.cuda.nccl.version = lambda: (2, 21, 5)\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    config = write_config(tmp_path, zoo["qwen2_gqa_untied"], rollout={
        "engine": "sglang", "sglang": sglang_section(colocated=False, python=str(python))})
    proc = run(train_cmd(config, tmp_path / "out"), check=False, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NCCL" in last and "2.21.5" in last and torch.cuda.nccl.version() != (2, 21, 5)
    assert not (tmp_path / "out" / "sglang_logs").exists()  # no server was started
