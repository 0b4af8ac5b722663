"""Slurm job scripts: shellcheck-clean (shellcheck installed by tests/slurm_cluster.py when
missing and root), the right node/GPU counts, torchrun and trainer arguments, the CPU mode,
placement arithmetic refused with one line, the committed examples up to date, and the
script's run-time flow (hostnames, SGLang addresses, SIGUSR1 -> checkpoint -> requeue)
executed under bash with stand-in srun/scontrol commands. tests/test_preemption.py runs the
CPU script on a real Slurm."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO
from slurm_cluster import ensure_tools, which

from megatron_sppo.cluster.slurm import (SlurmJob, layout_overrides, render_sbatch,
                                         time_limit_seconds)
from megatron_sppo.errors import UserError

sys.path.insert(0, str(REPO / "tools"))
import render_slurm  # noqa: E402

BASE = dict(job_name="sppo", config="/shared/cfg.yaml", output_dir="/shared/runs/sppo")
JOBS = {
    "single_colocated": SlurmJob(**BASE),
    "multi_colocated": SlurmJob(**BASE, nodes=4, policy_tp=2, policy_pp=2, sglang_tp=4,
                                partition="batch", account="proj", nccl_socket_ifname="^lo,docker0",
                                nccl_ib_hca="mlx5_0,mlx5_1", container_image="nvcr.io#nvidia/x:1",
                                container_mounts=("/shared:/shared", "/scratch")),
    "disaggregated": SlurmJob(**BASE, nodes=2, placement="disaggregated", rollout_nodes=3,
                              policy_tp=4, sglang_tp=2, sglang_model="/shared/hf/model",
                              sglang_args=("--kv-cache-dtype", "fp8_e5m2"),
                              overrides=("trainer.total_steps=7", "rollout.stop=['a, b']")),
    "cpu": SlurmJob(**BASE, nodes=2, gpus_per_node=0, cpus_per_rank=4, policy_tp=2,
                    nccl_socket_ifname="eth0"),
}


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)=?(.*)$", script, re.M))


def train_command(script: str) -> list[str]:
    """The TRAIN_CMD array's words, unquoted (variables left as written)."""
    block = script.split("TRAIN_CMD=(\n", 1)[1].split("\n)\n", 1)[0]
    return shlex.split(block)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_shellcheck_clean(name, tmp_path):
    ensure_tools("shellcheck")
    path = tmp_path / f"{name}.sbatch"
    path.write_text(render_sbatch(JOBS[name]))
    result = subprocess.run([which("shellcheck"), "-s", "bash", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name,nodes,dp", [("single_colocated", 1, 8), ("multi_colocated", 4, 8),
                                          ("disaggregated", 5, 4)])
def test_counts_and_torchrun_arguments(name, nodes, dp):
    job = JOBS[name]
    script = render_sbatch(job)
    opts = sbatch_options(script)
    assert opts["nodes"] == str(nodes) and job.total_nodes == nodes
    assert opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "1"
    assert opts["signal"] == "B:USR1@120" and "requeue" in opts
    assert opts["output"] == "/shared/runs/sppo/slurm-%x-%j.out"
    assert job.data_parallel_size == dp
    words = train_command(script)
    assert words[:6] == ["torchrun", f"--nnodes={job.nodes}", "--nproc-per-node=8",
                         "--rdzv-backend=c10d", "--rdzv-endpoint=$HEAD_NODE:29500",
                         "--rdzv-id=$SLURM_JOB_ID"]
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in words
    start = words.index("--no-python")
    assert words[start:start + 5] == ["--no-python", "megatron-sppo", "train", "--config",
                                      "$CONFIG"]
    assert words[-2:] == ["--resume", "auto"]
    assert words[start + 5:-2] == [*job.overrides, *layout_overrides(job)]
    trainer_srun = script.split("srun \\\n", 2)[-1]
    assert f"--nodes={job.nodes} \\" in trainer_srun and f"--ntasks={job.nodes} \\" in trainer_srun
    assert ("--container-image" in script) == (job.container_image is not None)


def test_cpu_job_has_no_gpu_and_runs_the_local_engine():
    job = JOBS["cpu"]
    script = render_sbatch(job)
    assert "gpu" not in script.lower() and "nccl" not in script.lower()
    assert "sglang" not in script.lower()
    assert "export OMP_NUM_THREADS=4" in script
    assert "NPROC_PER_NODE=$((SLURM_CPUS_ON_NODE / 4))" in script
    assert "export GLOO_SOCKET_IFNAME=eth0" in script
    words = train_command(script)
    assert "--nproc-per-node=$NPROC_PER_NODE" in words and "--nnodes=2" in words
    assert layout_overrides(job) == ["trainer.output_dir=/shared/runs/sppo",
                                     "policy.tensor_model_parallel_size=2",
                                     "policy.pipeline_model_parallel_size=1",
                                     "critic.tensor_model_parallel_size=2",
                                     "critic.pipeline_model_parallel_size=1",
                                     "rollout.engine=local"]
    assert words[-8:-2] == layout_overrides(job)


def test_layout_overrides():
    colocated = layout_overrides(JOBS["multi_colocated"])
    assert "policy.tensor_model_parallel_size=2" in colocated
    assert "critic.pipeline_model_parallel_size=2" in colocated
    assert "rollout.sglang.replicas=2" in colocated and "rollout.sglang.tp_size=4" in colocated
    disagg = layout_overrides(JOBS["disaggregated"])
    assert "rollout.sglang.addresses=$SGLANG_ADDRESSES" in disagg
    assert not any(o.startswith("rollout.sglang.replicas") for o in disagg)


def test_sglang_servers_per_rollout_node():
    script = render_sbatch(JOBS["disaggregated"])
    servers = [line for line in script.splitlines() if "sglang.launch_server" in line]
    assert len(servers) == 4  # 8 GPUs / tp 2
    for i, line in enumerate(servers):
        assert f"--port {30000 + i} " in line and f"--base-gpu-id {2 * i} " in line
        assert "--tp-size 2 " in line and "--host 0.0.0.0" in line
        assert line.split(" >", 1)[0].endswith("--kv-cache-dtype fp8_e5m2")


@pytest.mark.parametrize("changes,message", [
    (dict(policy_tp=3), "policy tp 3 does not divide 8 GPUs per node"),
    (dict(nodes=3, policy_tp=8, policy_pp=2), "tp x pp = 16 does not divide the 24 trainer GPUs"),
    (dict(sglang_tp=16), "sglang tp 16 does not divide 8"),
    (dict(gpus_per_node=6, sglang_tp=4), "sglang tp 4 does not divide 6"),
    (dict(rollout_nodes=1), "placement colocated"),
    (dict(placement="disaggregated"), "needs at least 1 rollout node"),
    (dict(placement="disaggregated", rollout_nodes=1), "sglang model"),
    (dict(placement="split"), "choose one of colocated, disaggregated"),
    (dict(nodes=0), "nodes = 0"),
    (dict(time_limit="1:2:3:4"), "not a Slurm time"),
    (dict(time_limit="2", signal_lead_s=120), "below the time limit"),
    (dict(output_dir="runs/x"), "must be an absolute path"),
    (dict(job_name="my job"), "job name"),
    (dict(container_image="img", container_mounts=("/other:/other",)), "not under any container"),
    (dict(container_image="img", container_mounts=("/data:/shared",)), "at its own path"),
    (dict(overrides=("policy.tensor_model_parallel_size=2",)), "set by the job layout"),
    (dict(overrides=("trainer.total_steps",)), "not key=value"),
    (dict(sglang_mem_fraction=1.5), "mem fraction"),
    (dict(gpus_per_node=-1), "gpus per node = -1: must be >= 0 (0: a CPU job)"),
    (dict(cpus_per_rank=2), "cpus per rank is for CPU jobs"),
    (dict(gpus_per_node=0, cpus_per_rank=0), "cpus per rank = 0"),
    (dict(gpus_per_node=0, placement="disaggregated", rollout_nodes=1, sglang_model="/m"),
     "a CPU job (gpus per node 0) runs the local rollout engine"),
])
def test_layout_errors_are_one_line(changes, message):
    job = SlurmJob(**{**BASE, **changes})
    with pytest.raises(UserError, match=re.escape(message)) as err:
        render_sbatch(job)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200),
                                          ("1-0", 86400), ("1-02:30", 95400),
                                          ("2-00:00:10", 172810)])
def test_time_limit_forms(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_examples_are_rendered_by_the_tool(capsys):
    """Each committed example re-renders from the command line in its header."""
    examples = sorted((REPO / "examples" / "slurm").glob("*.sbatch"))
    assert {p.stem for p in examples} >= {"single_node_colocated", "multi_node_colocated",
                                          "disaggregated"}
    for path in examples:
        text = path.read_text()
        command = re.search(r"^# Rendered by: (.*)$", text, re.M).group(1)
        argv = shlex.split(command)
        assert argv[0] == "tools/render_slurm.py"
        assert render_slurm.main([*argv[1:], "--dry-run"]) == 0
        assert capsys.readouterr().out == text, f"{path.name} is stale: re-render it"


def test_cli_writes_atomically_and_refuses_bad_layouts(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    args = ["--job-name", "x", "--config", "/s/c.yaml", "--output-dir", "/s/o", "--nodes", "2"]
    assert render_slurm.main([*args, "-o", str(out)]) == 0
    assert out.read_text().startswith("#!/bin/bash") and os.access(out, os.X_OK)
    assert str(out) not in out.read_text() and not list(tmp_path.glob(".*.tmp"))
    assert render_slurm.main([*args, "--tp", "3", "-o", str(tmp_path / "bad.sbatch")]) == 2
    assert capsys.readouterr().err.startswith("error: policy tp 3")
    assert not (tmp_path / "bad.sbatch").exists()
    assert render_slurm.main(args) == 2  # neither --out nor --dry-run


# ---- the script itself, run by bash with stand-ins for Slurm's commands ----

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a\\ngpu-b\\ngpu-c\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""
# A trainer step that, like torchrun after a stop signal, exits 1: on SIGUSR1 after writing
# stopped.json as the trainer does once its checkpoint is complete (FAKE_TRAIN=no-checkpoint:
# without it); FAKE_TRAIN=scancel: at once with stopped.json (the signal went to the steps
# only); FAKE_TRAIN=exit:N: at once with status N. An SGLang step runs until it is killed.
FAKE_SRUN = """#!/bin/bash
if [[ " $* " == *" torchrun "* ]]; then
  printf '%s\\n' "$@" > "$FAKE_LOG.train_args"
  stopped() { echo '{"signal": "SIGUSR1", "step": 3}' > "$OUTPUT_DIR/stopped.json"; }
  case "${FAKE_TRAIN:-}" in
    exit:*) exit "${FAKE_TRAIN#exit:}" ;;
    scancel) stopped; exit 1 ;;
  esac
  trap 'echo "trainer got USR1" >> "$FAKE_LOG"; kill "$sleeper"
        [ "$FAKE_TRAIN" = no-checkpoint ] || stopped; exit 1' USR1
  sleep 30 &
  sleeper=$!
  wait
else
  printf '%s\\n' "$@" > "$FAKE_LOG.sglang_args"
  exec sleep 30
fi
"""


def _run_script(tmp_path, job, *, fake_train="", send_usr1=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    log = tmp_path / "log"
    log.write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_ID": "42", "SLURM_CPUS_ON_NODE": "4",
           "FAKE_TRAIN": fake_train}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if send_usr1:
        deadline = time.monotonic() + 20
        while not (tmp_path / "log.train_args").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the trap is set before srun starts; let srun's own trap be set too
        proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    return proc.returncode, output, log.read_text(), tmp_path


def test_usr1_checkpoints_then_requeues(tmp_path):
    job = SlurmJob(**{**BASE, "output_dir": str(tmp_path / "run")}, nodes=2,
                   placement="disaggregated", rollout_nodes=1, sglang_tp=4,
                   sglang_model="/shared/hf")
    status, output, log, root = _run_script(tmp_path, job, send_usr1=True)
    assert status == 1, output  # torchrun's status after a signal; the job is requeued
    assert "trainer got USR1" in log and "scontrol requeue 42" in log, output
    assert log.index("trainer got USR1") < log.index("scontrol requeue 42")
    assert 'stopped at a checkpoint: {"signal": "SIGUSR1", "step": 3}; requeueing' in output
    train_args = (root / "log.train_args").read_text().splitlines()
    assert "--nodelist=gpu-a,gpu-b" in train_args and "--cpus-per-task=4" in train_args
    assert "--rdzv-endpoint=gpu-a:29500" in train_args and "--rdzv-id=42" in train_args
    assert "rollout.sglang.addresses=gpu-c:30000,gpu-c:30001" in train_args
    assert "--nodelist=gpu-c" in (root / "log.sglang_args").read_text().splitlines()


@pytest.mark.parametrize("fake_train, send_usr1, requeued, says", [
    ("scancel", False, True, "requeueing job 42"),  # scancel --signal=USR1: steps only
    ("no-checkpoint", True, False, "the trainer did not stop at a checkpoint"),
])
def test_requeue_follows_the_trainers_checkpoint(tmp_path, fake_train, send_usr1, requeued,
                                                 says):
    """A CPU job (4 CPUs, 2 per rank: 2 ranks) is requeued iff the trainer stopped at a
    checkpoint, whoever sent the signal."""
    job = SlurmJob(**{**BASE, "output_dir": str(tmp_path / "run")}, gpus_per_node=0,
                   cpus_per_rank=2)
    status, output, log, root = _run_script(tmp_path, job, fake_train=fake_train,
                                            send_usr1=send_usr1)
    assert status == 1 and says in output, output
    assert ("scontrol requeue 42" in log) == requeued
    train_args = (root / "log.train_args").read_text().splitlines()
    assert "--nproc-per-node=2" in train_args and "rollout.engine=local" in train_args
    assert not any(a.startswith("--gpus") for a in train_args)


@pytest.mark.parametrize("train_status", [0, 3])
def test_no_requeue_without_signal(tmp_path, train_status):
    job = SlurmJob(**{**BASE, "output_dir": str(tmp_path / "run")}, nodes=3)
    status, output, log, root = _run_script(tmp_path, job, fake_train=f"exit:{train_status}")
    assert status == train_status, output
    assert "requeue" not in log
    train_args = (root / "log.train_args").read_text().splitlines()
    assert "--nodelist=gpu-a,gpu-b,gpu-c" in train_args
    assert "rollout.sglang.replicas=8" in train_args
