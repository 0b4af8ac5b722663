"""The RL loop. One step reads like the design:

prompts -> critic values -> rollouts -> rewards -> advantages -> critic update
-> policy update -> weight sync -> metrics -> eval every K steps -> checkpoint every M steps.

Each phase is a called function; this module only sequences them, times them, and handles
resume, signals (SIGTERM/SIGUSR1: checkpoint and exit) and non-finite steps.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sppo.config import Config, write_yaml_atomic
from megatron_sppo.errors import UserError
from megatron_sppo.trainer import rl_step
from megatron_sppo.trainer.checkpointing import (latest_checkpoint, load_training_checkpoint,
                                                 remove_partial_checkpoints,
                                                 save_training_checkpoint,
                                                 start_checkpoint_writer)
from megatron_sppo.trainer.components import Components, build_components, make_step_batch
from megatron_sppo.trainer.preemption import clear_stopped, stop_request
from megatron_sppo.trainer.sampling import generate_and_score
from megatron_sppo.trainer.selection import select_step_prompts


class PhaseTimer:
    """Wall-clock seconds per phase of a step (``time_<phase>`` metrics)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.times[f"time_{phase}"] = (self.times.get(f"time_{phase}", 0.0)
                                       + time.perf_counter() - start)


def step_seed(cfg: Config, step: int) -> int:
    return cfg.trainer.seed * 1_000_003 + step


def run_step(c: Components, cfg: Config, step: int) -> dict:
    """One RL step; returns its metrics (identical on every rank). Its wall time is all in
    the ``time_*`` metrics: ``time_other`` is what falls outside the named phases (batch
    assembly, advantages, statistics)."""
    start = time.perf_counter()
    timer = PhaseTimer()
    seed = step_seed(cfg, step)
    torch.manual_seed(seed)
    chosen = None
    if cfg.algorithm.prompt_selection:
        with timer("selection"):  # the critic's forward over the pool: part of the step
            chosen = select_step_prompts(c, cfg, seed)
        records = chosen.records
    else:
        with timer("data"):
            records = c.prompts.next_batch(cfg.trainer.prompts_per_step)
    policy_learns = step > cfg.critic.warmup_steps or c.critic is None
    # no sync follows a warm-up step: the engine keeps its weights
    sampled = generate_and_score(c, cfg, records, seed, timer, release_weights=policy_learns)
    batch = make_step_batch(c, cfg, sampled.records, sampled.rollouts, sampled.scored)
    metrics = {**sampled.scored.metrics, **sampled.metrics, **(chosen.metrics if chosen else {})}

    # a single update's own forward gives the pre-update values and log-probs (rl_step)
    critic_first = c.critic is not None and rl_step.critic_values_from_update(batch, cfg)
    if c.critic is not None:
        with timer("critic"):
            if chosen is not None:  # the pool's forward already gave the chosen prompts' values
                batch.critic_logits = chosen.critic_logits[batch.group_index]
            if (cfg.critic.head_bias_init == "first_batch" and not c.state.get("bias_set")
                    and cfg.algorithm.estimator == "sppo"):
                metrics["critic_head_bias"] = rl_step.set_head_bias(
                    c.critic, batch.correctness.mean().item())
                c.state["bias_set"] = True
                batch.critic_logits = None  # the pool's values predate the new bias
            if critic_first:
                metrics.update(rl_step.update_critic(c.critic, batch, cfg, seed))
            elif batch.critic_logits is None:
                rl_step.critic_values(c.critic, batch, cfg)
    elif cfg.algorithm.running_mean_baseline:
        rl_step.running_mean_baseline(c.state, batch, cfg.algorithm.baseline_momentum)
    with timer("policy"):
        if cfg.algorithm.old_logprobs == "engine":
            batch.old_logprobs = batch.tensors.engine_logprobs
        elif not (policy_learns and rl_step.old_logprobs_from_update(batch, cfg)):
            batch.old_logprobs = rl_step.forward_logprobs(c.policy, batch, cfg)
        if c.reference is not None:
            batch.ref_logprobs = c.reference.logprobs(batch, cfg)
    rl_step.compute_step_advantages(batch, cfg)
    if c.critic is not None and not critic_first:
        with timer("critic"):
            metrics.update(rl_step.update_critic(c.critic, batch, cfg, seed))
    if policy_learns:
        with timer("policy"):
            metrics.update(rl_step.update_policy(c.policy, batch, cfg, seed))
    with timer("sync"):
        if policy_learns:
            c.sync_weights(step)
    metrics.update(step_metrics(batch, cfg))
    metrics.update(c.colocation.memory)
    timer.times["time_other"] = time.perf_counter() - start - sum(timer.times.values())
    metrics.update(timer.times)
    generated = sampled.generated_tokens  # dropped groups included (dynamic sampling)
    metrics["generated_tokens"] = generated
    metrics["tokens_per_second"] = generated / max(sum(timer.times.values()), 1e-9)
    return metrics


def step_metrics(batch: rl_step.StepBatch, cfg: Config) -> dict:
    """Sequence-level statistics of the step (rewards, advantages, critic calibration)."""
    from megatron_sppo.algorithms import critic_calibration, masked_mean

    mask = batch.tensors.response_mask.bool()
    lengths = mask.sum(-1).float()
    seq_adv = masked_mean(batch.advantages, mask, -1)
    mismatch = (batch.old_logprobs - batch.tensors.engine_logprobs).abs()
    out = {"reward_mean": batch.rewards.mean().item(),
           "accuracy": batch.correctness.mean().item(),
           "advantage_mean": seq_adv.mean().item(),
           "advantage_std": seq_adv.std().item() if batch.size > 1 else 0.0,
           "response_length_mean": lengths.mean().item(),
           "response_length_max": lengths.max().item(),
           "truncated_fraction": batch.truncated.float().mean().item(),
           "logprob_mismatch_mean": masked_mean(mismatch, mask).item(),
           "logprob_mismatch_max": mismatch[mask].max().item() if mask.any() else 0.0}
    if batch.critic_logits is not None:
        calib = critic_calibration(torch.sigmoid(batch.critic_logits), batch.correctness)
        out["value_mean"] = torch.sigmoid(batch.critic_logits).mean().item()
        out["critic_brier"] = calib["critic/brier"].item()
        out["critic_ece"] = calib["critic/ece"].item()
        out["critic_auc"] = calib["critic/auc"].item()
    elif batch.values is not None:
        out["value_mean"] = masked_mean(batch.values, mask).item()
    return out


def is_finite_step(metrics: dict) -> bool:
    keys = ("policy_loss", "grad_norm", "critic_loss", "critic_grad_norm")
    return all(metrics.get(k) is None or metrics[k] == metrics[k]
               and abs(metrics[k]) != float("inf") for k in keys)


def train(cfg: Config, resume: str | None = None) -> Path:
    """Run (or resume) training; returns the output directory."""
    stop = stop_request()  # installed already when the train command started
    out = Path(cfg.trainer.output_dir)
    c = build_components(cfg)
    rank0 = dist.get_rank() == 0
    if rank0:
        clear_stopped(out)
        for name in remove_partial_checkpoints(out):
            print(f"removed checkpoints/{name}: a save that never completed", flush=True)
    start_checkpoint_writer()
    start, resumed = 0, False
    if resume:
        path = latest_checkpoint(out) if resume == "auto" else Path(resume)
        if path is not None:
            run = load_training_checkpoint(path, c.trainable())
            start, resumed = run["step"], True
            c.load_state(run)
            c.sync_weights(start)
            if rank0:
                print(f"resumed from {path} (step {start})", flush=True)
    if rank0:
        write_yaml_atomic(cfg, out / "config.yaml")
    from megatron_sppo.trainer.metrics_log import MetricsLog

    log = (MetricsLog(out, cfg.trainer.total_steps, start, cfg.trainer.tensorboard,
                      cfg.trainer.progress, resumed) if rank0 else None)
    bad_in_a_row = 0
    if cfg.trainer.eval_before and start == 0 and c.eval_records:
        before = c.evaluate(0)
        if log is not None:
            log.log(0, before)
    try:
        for step in range(start + 1, cfg.trainer.total_steps + 1):
            metrics = run_step(c, cfg, step)
            if not is_finite_step(metrics) or metrics.get("policy_skipped") or metrics.get(
                    "critic_skipped"):
                bad_in_a_row += 1
                c.state["skipped_steps"] = c.state.get("skipped_steps", 0) + 1
                if bad_in_a_row >= cfg.trainer.max_bad_steps:
                    raise UserError(
                        f"{bad_in_a_row} steps in a row had non-finite losses or gradients (last "
                        f"at step {step}): lower policy.lr/critic.lr or check the data; resume "
                        "from the last checkpoint with --resume auto")
            else:
                bad_in_a_row = 0
            metrics["skipped_steps"] = c.state.get("skipped_steps", 0)
            stopping, seconds = stop.poll(sum(v for k, v in metrics.items()
                                              if k.startswith("time_")))
            c.state["train_seconds"] = c.state.get("train_seconds", 0.0) + seconds
            metrics["train_seconds"] = c.state["train_seconds"]
            out_of_time = 0 < cfg.trainer.max_train_seconds <= c.state["train_seconds"]
            if (cfg.trainer.eval_interval and step % cfg.trainer.eval_interval == 0) or (
                    out_of_time and c.eval_records):
                metrics.update(c.evaluate(step))
            if log is not None:
                log.log(step, metrics)
            if (cfg.trainer.save_interval and step % cfg.trainer.save_interval == 0) or stopping:
                with stop.timed_save(step, stopping):
                    save_training_checkpoint(out, step, c.trainable(), c.state_dict(),
                                             cfg.trainer.keep_last)
            if stopping:
                if rank0 and step < cfg.trainer.total_steps:
                    stop.mark_stopped(out, step)
                break
            if out_of_time:
                if rank0:
                    print(f"trainer.max_train_seconds={cfg.trainer.max_train_seconds:g} reached "
                          f"at step {step}", flush=True)
                break
    finally:
        if log is not None:
            log.close()
        c.close()
    return out
