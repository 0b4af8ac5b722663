"""Preemption that loses nothing.

* Two gloo ranks under torchrun (the demo config, a tiny random model): every checkpoint's
  common state is identical on every rank (no "common state dict differs" warning), and a
  stale ``.partial`` save is removed at start-up.
* Helper processes started shielded survive SIGUSR1 and SIGTERM, which kill an unshielded
  one; the stop is reported against the signal lead.
* A real one-node Slurm cluster (tests/slurm_cluster.py; root, or skipped with the install
  command): the CPU sbatch script rendered for the demo config gets its time-limit signal,
  checkpoints the current step and requeues; the next run is stopped by
  ``scancel --signal=USR1`` mid-step, checkpoints and requeues; the last one completes. The
  metrics of all the runs together equal the uninterrupted run's, step for step.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import operator
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run
from slurm_cluster import PERIODIC_CHECK_S, SlurmCluster, ensure_tools

from megatron_sppo.rewards import WorkerPool
from megatron_sppo.runtime.distributed import free_port
from megatron_sppo.runtime.signals import STOP_SIGNALS, shielded_spawn
from megatron_sppo.trainer.preemption import LEAD_ENV, StopRequest

sys.path.insert(0, str(REPO / "tools"))
import render_slurm  # noqa: E402

DEMO = REPO / "examples" / "configs" / "tiny_cpu_sppo.yaml"
STEPS = 100
# one update on each batch of 8 prompts (the demo config's mini-batches hold 16)
OVERRIDES = (f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=8",
             "trainer.mini_batch_size=8", "critic.mini_batch_size=8",
             "trainer.save_interval=25", "trainer.eval_interval=0", "data.eval_size=8",
             "rollout.max_response_length=12", "trainer.progress=false",
             "trainer.tensorboard=false")
TIMING = ("train_seconds", "tokens_per_second")  # wall-clock figures, besides time_*
DIFFERS = "common state dict differs"
LIMIT_MIN, LEAD = 2, 90  # the job's time limit (minutes); SIGUSR1 this many seconds before it


def demo_overrides(zoo) -> list[str]:
    return [f"policy.checkpoint={zoo['qwen2_gqa_untied']}", *OVERRIDES]


def read_metrics(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """The uninterrupted run, two ranks; its checkpoint folder starts with a stale save."""
    out = tmp_path_factory.mktemp("reference") / "run"
    (out / "checkpoints" / "step_0000099.partial").mkdir(parents=True)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                f"--master-port={free_port()}", "-m", "megatron_sppo.train", "--config", DEMO,
                f"trainer.output_dir={out}", *demo_overrides(zoo)])
    return out, proc.stdout + proc.stderr, read_metrics(out)


def test_checkpoints_agree_across_ranks(reference):
    out, log, metrics = reference
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert DIFFERS not in log, [line for line in log.splitlines() if DIFFERS in line][:2]
    assert "removed checkpoints/step_0000099.partial: a save that never completed" in log
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000075", "step_0000100"]


def test_shielded_helpers_survive_stop_signals(monkeypatch):
    """A spawned process, a reward worker and megatron-core's checkpoint writer, all started
    shielded, outlive SIGUSR1 and SIGTERM; the same process started plainly dies of them."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_sppo.trainer.checkpointing import start_checkpoint_writer

    ctx = mp.get_context("spawn")
    plain = ctx.Process(target=time.sleep, args=(60,))
    plain.start()
    with shielded_spawn():
        shielded = ctx.Process(target=time.sleep, args=(60,))
        shielded.start()
    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # a writer of this test's own
    start_checkpoint_writer()
    queue = filesystem_async.get_write_results_queue()
    with WorkerPool(workers=1, timeout_s=30) as pool:
        assert pool.run([(operator.add, (2, 3))]).values == [5]
        worker = pool._workers[0].proc
        helpers = [shielded.pid, worker.pid, queue._manager._process.pid]
        for sig in STOP_SIGNALS:
            for pid in (plain.pid, *helpers):
                os.kill(pid, sig)
        plain.join(30)
        assert plain.exitcode == -signal.SIGTERM or plain.exitcode == -signal.SIGUSR1
        result = pool.run([(operator.mul, (2, 3))])
        assert result.values == [6] and result.errors == 0 and pool._workers[0].proc is worker
    queue.put("written")
    assert queue.get() == "written"
    assert shielded.is_alive()
    shielded.kill()
    shielded.join()
    queue._manager.shutdown()


def test_train_command_reaches_its_handler_without_torch():
    """The train command installs its stop handler before anything imports torch (seconds
    under load): until then a stop signal would kill the rank."""
    code = ("import sys; from megatron_sppo.cli import main; "
            "from megatron_sppo.trainer.preemption import stop_request; "
            "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")
    assert run([sys.executable, "-c", code]).stdout.strip() == "[]"


@pytest.fixture()
def stop_request(monkeypatch):
    """A StopRequest in this process, its signal handlers restored afterwards."""
    monkeypatch.setenv(LEAD_ENV, str(LEAD))
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield StopRequest()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_stop_is_reported_against_the_signal_lead(stop_request, capsys):
    stop = stop_request
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.signal == "SIGUSR1"
    stop.received -= LEAD - 3  # 3 s of the lead left; the last checkpoint took 5 s
    stop.save_seconds = 5.0
    with stop.timed_save(3, stopping=True):
        pass
    out = capsys.readouterr().out
    assert re.search(rf"SIGUSR1 received: checkpointing step 3 \({LEAD - 3}\.\d s after it, "
                     rf"[23]\.\d s of the {LEAD} s signal lead left\)", out), out
    assert "the last checkpoint took 5.0 s, more than is left" in out
    assert re.search(r"checkpointed step 3 in \d+\.\d s, \d+\.\d s after SIGUSR1", out), out
    assert "ran out" not in out
    stop.received -= LEAD  # now past the lead: the job would have been killed mid-save
    with stop.timed_save(4, stopping=True):
        pass
    assert f"after the {LEAD} s signal lead ran out" in capsys.readouterr().out


def test_slurm_time_limit_and_manual_signal(reference, zoo, tmp_path):
    """The rendered CPU script on a real Slurm: run 1 ends at its time-limit signal, run 2 at
    ``scancel --signal=USR1`` mid-step, run 3 completes."""
    ensure_tools()
    expected = reference[2]
    out, script = tmp_path / "run", tmp_path / "job.sbatch"
    out.mkdir()
    assert render_slurm.main(["--job-name", "sppo-cpu", "--config", str(DEMO), "--output-dir",
                              str(out), "--gpus-per-node", "0", "--time", str(LIMIT_MIN),
                              "--signal-lead", str(LEAD), "--rdzv-port", str(free_port()),
                              "-o", str(script), *demo_overrides(zoo)]) == 0
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GLOO_SOCKET_IFNAME": "lo"}
    with SlurmCluster(tmp_path / "slurm") as cluster:
        # The signal comes at slurmctld's first periodic check at least (limit - lead - 30 s)
        # = 0 s after the job's start: for a job started 5 s after one of its checks, the next
        # one, 25 s into the job. The trainer's first step ends ~20 s into it on 2 idle cores;
        # if it is not up yet, it runs one step and checkpoints it, and the long lead covers
        # that on a loaded machine. On an idle one the stop takes a step and a save, whatever
        # the lead.
        submit_at = cluster.started + 5
        while submit_at < time.monotonic():
            submit_at += PERIODIC_CHECK_S
        time.sleep(submit_at - time.monotonic())
        job = cluster.submit(script, env)
        log_path = out / f"slurm-sppo-cpu-{job}.out"

        def restarts() -> int:
            return int(cluster.job(job)["Restarts"])

        def logged_steps() -> int:
            path = out / "metrics.jsonl"
            return len(path.read_text().splitlines()) if path.is_file() else 0

        cluster.wait_for(lambda: restarts() >= 1, 60 * LIMIT_MIN + 2 * PERIODIC_CHECK_S,
                         "the time-limit requeue")
        assert logged_steps() < STEPS, "the run finished before its time-limit signal: raise STEPS"
        cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=5")  # no more time limits
        first = logged_steps()
        cluster.wait_for(lambda: logged_steps() >= first + 2, 180, "the requeued run's steps")
        cluster.run("scancel", "--signal=USR1", job)
        cluster.wait_for(lambda: restarts() >= 2, 120, "the requeue after scancel")
        cluster.wait_for(lambda: cluster.job(job)["JobState"] not in ("PENDING", "RUNNING",
                                                                    "COMPLETING", "REQUEUED"),
                         300, "the job to end")
        state = cluster.job(job)
    log = log_path.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-3000:]

    runs = log.split("requeueing job")
    assert len(runs) == 3, log[-3000:]  # two requeues, each in the log
    assert f"time limit in {LEAD} s" in runs[0]  # the batch shell's --signal=B:USR1
    assert not any(f"time limit in {LEAD} s" in r for r in runs[1:])  # scancel: steps only
    stops = [int(s) for s in re.findall(r"checkpointed step (\d+) in", log)]
    resumes = [(int(a), int(b)) for a, b in re.findall(r"resumed from \S+/step_(\d+) \(step "
                                                       r"(\d+)\)", log)]
    assert len(stops) == 2 and resumes == [(s, s) for s in stops], log[-3000:]
    assert 0 < stops[0] < stops[1] < STEPS
    for text in (DIFFERS, "ran out", "may not complete", "removed checkpoints/"):
        assert text not in log, text
    assert not list((out / "checkpoints").glob("*.partial"))
    assert not (out / "stopped.json").exists()

    got = read_metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, record in expected.items():
        for key, value in record.items():
            if not key.startswith("time_") and key not in TIMING:
                assert got[step][key] == value, (step, key)
