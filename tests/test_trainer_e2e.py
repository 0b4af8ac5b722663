"""`megatron-sppo train` end to end on CPU: every phase of a step at TP=1 and at TP=2 x PP=2
(torchrun + gloo, the critic at its own TP=1 x PP=2 x DP=2 on the same ranks) with the same
metrics, a run killed with SIGKILL and resumed from its last
checkpoint reproducing the uninterrupted run's metrics exactly, and config errors reported
in one line before any model is built."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO, run

from megatron_sppo.runtime.distributed import free_port

STEPS = 4
# a tiny random policy on the built-in arithmetic task: fast, and every phase runs
BASE = {
    "critic": {"lr": 1e-3, "head_bias_init": "first_batch"},
    "policy": {"lr": 1e-3},
    "rollout": {"n": 1, "temperature": 1.0, "max_prompt_length": 64,
                "max_response_length": 12},
    "data": {"train_files": ["builtin:arithmetic"], "eval_files": ["builtin:arithmetic"],
             "eval_size": 8},
    "reward": {"function": "arithmetic"},
    "trainer": {"total_steps": STEPS, "prompts_per_step": 8, "mini_batch_size": 4,
                "ppo_epochs": 2, "max_tokens_per_microbatch": 96, "eval_interval": STEPS,
                "eval_samples": 2, "progress": False, "seed": 3},
}


def write_config(tmp_path, hf_dir, **sections) -> str:
    cfg = json.loads(json.dumps(BASE))
    cfg["policy"]["checkpoint"] = str(hf_dir)
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_cmd(config, out, *overrides, nproc=1):
    launcher = ([sys.executable, "-m", "megatron_sppo"] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                 f"--master-port={free_port()}", "-m", "megatron_sppo.train"])
    head = ["train"] if nproc == 1 else []
    return [*launcher, *head, "--config", config, f"trainer.output_dir={out}", *overrides]


def metrics(out) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def tp1_run(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    config = write_config(tmp, zoo["qwen2_gqa_untied"])
    out = tmp / "tp1"
    run(train_cmd(config, out, "trainer.save_interval=2"))
    return config, out, metrics(out)


PHASES = ("time_rollout", "time_reward", "time_critic", "time_policy", "time_sync")
REQUIRED = ("reward_mean", "advantage_mean", "value_mean", "accuracy", "response_length_mean",
            "policy_loss", "critic_loss", "grad_norm", "clip_fraction", "approx_kl", "entropy",
            "critic_brier", "logprob_mismatch_mean", "tokens_per_second", *PHASES)


def test_every_phase_reports_finite_metrics(tp1_run):
    _, out, m = tp1_run
    assert sorted(m) == list(range(1, STEPS + 1))
    for step, record in m.items():
        for key in REQUIRED:
            assert key in record and math.isfinite(record[key]), (step, key)
        # the local engine's sampler log-probs equal Megatron's (fp32, padded vocab masked)
        assert record["logprob_mismatch_mean"] <= 1e-5, step
        assert record["logprob_mismatch_max"] <= 1e-4, step
    assert "eval/pass1_sampled" in m[STEPS] and "eval/critic_pearson" in m[STEPS]
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000002", "step_0000004"]


def test_tp2_pp2_matches_tp1(tp1_run, tmp_path):
    """Policy TP=2 x PP=2; the critic on the same 4 ranks at a layout of its own (TP=1 x
    PP=2 x DP=2, its own process groups)."""
    config, _, reference = tp1_run
    out = tmp_path / "tp2pp2"
    layout = ["policy.tensor_model_parallel_size=2", "policy.pipeline_model_parallel_size=2",
              "critic.tensor_model_parallel_size=1", "critic.pipeline_model_parallel_size=2"]
    run(train_cmd(config, out, *layout, nproc=4), timeout=900)
    got = metrics(out)
    for step in range(1, STEPS + 1):
        for key in ("reward_mean", "policy_loss", "critic_loss", "grad_norm", "entropy",
                    "value_mean", "advantage_mean"):
            assert got[step][key] == pytest.approx(reference[step][key], rel=1e-3,
                                                   abs=1e-5), (step, key)
        # at TP=2 the log-probs come from vocab-parallel logits: still the engine's
        assert got[step]["logprob_mismatch_mean"] <= 1e-5, step
        assert got[step]["logprob_mismatch_max"] <= 1e-4, step


def test_sigkill_and_resume_reproduces_the_run(tp1_run, tmp_path):
    config, _, reference = tp1_run
    out = tmp_path / "killed"
    cmd = train_cmd(config, out, "trainer.save_interval=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.read_text().strip() == "step_0000002"
    run(train_cmd(config, out, "trainer.save_interval=2", "--resume", "auto"))
    resumed = metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in (3, 4):
        for key, value in reference[step].items():
            if not key.startswith("time_") and key not in ("tokens_per_second", "train_seconds"):
                assert resumed[step][key] == value, (step, key)


@pytest.mark.parametrize("override, message", [
    ("trainer.bogus=1", "unknown config key trainer.bogus"),
    ("algorithm.estimator=grpo", "n >= 2"),
    ("algorithm.estimator=nope", "unknown advantage estimator 'nope'"),
    ("policy.tensor_model_parallel_size=3", "does not divide the 1 launched ranks"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5"),
    ("trainer.mini_batch_size=3", "must divide trainer.prompts_per_step"),
    ("data.format=xml", "data.format"),
    ("policy.fp8.format=e5m2", "policy.fp8.format='e5m2'"),
    ("critic.fp8.format=e4m3", "critic.fp8.format=e4m3 needs"),  # no TE / GPU here
    ("rollout.sglang.n_mode=parallel rollout.sglang.enable_deterministic_inference=true",
     "draws the n samples of a prompt with one seed"),
])
def test_config_errors_are_one_line(zoo, tmp_path, override, message):
    config = write_config(tmp_path, zoo["qwen2_gqa_untied"])
    proc = run(train_cmd(config, tmp_path / "out", *override.split()), check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "out").exists()  # nothing built or written
