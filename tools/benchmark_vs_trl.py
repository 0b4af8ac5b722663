#!/usr/bin/env python
"""megatron_sppo against Hugging Face TRL's GRPOTrainer on the CPU demo task.

    python tools/benchmark_vs_trl.py --output-dir outputs/vs_trl      # 25 min on 2 idle cores
    python tools/benchmark_vs_trl.py --output-dir /tmp/q --quick      # tiny budgets (the test)

Three systems, one after the other, for each seed: TRL's GRPOTrainer (installed by this
script into its own pinned virtual environment, ``--trl-venv``; TRL is never a dependency of
megatron_sppo), megatron_sppo GRPO and megatron_sppo SPPO, with the held-out protocol of
examples/study.py: the same warm start (``builtin:tiny-arithmetic``'s SFT checkpoint,
exported to HF once), the same prompt generator (TRL gets the prompts in the order
megatron_sppo's GRPO run draws them), GRPO 8 prompts x 8, SPPO 64 x 1, each run stopping when
its training seconds reach ``--max-train-seconds`` (evaluation and checkpoint saving
excluded). Every ``--eval-interval`` steps both sides are scored by the same evaluator
(megatron_sppo.trainer.evaluation.sample_and_score: ``--eval-size`` held-out problems x
``--eval-samples`` samples at the rollout temperature, the same seeds): in-loop for
megatron_sppo, on TRL's saved checkpoints afterwards.

Prints (and writes to ``benchmark.md``) one table: median step time and its phases, steps in
the budget, held-out sampled pass@1 after ``--tokens-at`` generated tokens, generated tokens
and training seconds to ``--target``, peak pass@1 (means over seeds), the three targets of the
comparison, both sides' full settings and every setting that differs; ``benchmark.json``
holds every step and evaluation, ``benchmark.png`` the curves. Runs already complete in
``--output-dir`` are reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.demo.run import REPO_CONFIG, eval_points, train_run  # noqa: E402
from megatron_sppo.errors import UserError  # noqa: E402
from megatron_sppo.fileio import write_text_atomic  # noqa: E402
from study import METHODS, plot, reaching  # noqa: E402  (examples/study.py)

SYSTEMS = ("trl_grpo", "grpo", "sppo")
LABELS = {"trl_grpo": "TRL GRPOTrainer", "grpo": "megatron_sppo GRPO",
          "sppo": "megatron_sppo SPPO"}
TRL_CONSTRAINTS = REPO / "tools" / "constraints-trl.txt"
CPU_CONSTRAINTS = REPO / "tools" / "constraints-cpu.txt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--max-train-seconds", type=float, default=75.0)
    p.add_argument("--max-steps", type=int, default=100000,
                   help="also stop a run after this many steps")
    p.add_argument("--eval-interval", type=int, default=5, help="steps between evaluations")
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per problem")
    p.add_argument("--target", type=float, default=0.65,
                   help="held-out sampled pass@1 for tokens/seconds-to-target")
    p.add_argument("--tokens-at", type=float, default=55000,
                   help="report held-out pass@1 after this many generated tokens")
    p.add_argument("--trl-venv", default=str(REPO / ".venv-trl"),
                   help="TRL's own virtual environment (created when missing or outdated)")
    p.add_argument("--config", default=str(REPO_CONFIG))
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets: one seed, 2 steps a run, 8 held-out problems x 2 "
                        "evaluated at steps 0 and 2, one reward worker")
    return p


# ---- set-up -------------------------------------------------------------------------------

def ensure_trl_venv(venv: Path) -> Path:
    """TRL's own virtual environment: TRL and what it adds to our stack, pinned by
    tools/constraints-trl.txt, with torch and transformers seen from this environment (a
    .pth line), so both trainers run the very same torch and transformers builds."""
    python = venv / "bin" / "python"
    here = sysconfig.get_paths()["purelib"]
    stamp = venv / ".megatron-sppo-trl"
    want = hashlib.sha256((TRL_CONSTRAINTS.read_text() + CPU_CONSTRAINTS.read_text()
                           + here).encode()).hexdigest()
    if python.is_file() and stamp.is_file() and stamp.read_text() == want:
        return python
    print(f"setting up TRL in its own environment {venv} (pinned: {TRL_CONSTRAINTS.name})",
          flush=True)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--clear",
                    str(venv)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True)
    Path(purelib.stdout.strip(), "_megatron_sppo_shared.pth").write_text(here + "\n")
    trl = next(line for line in TRL_CONSTRAINTS.read_text().splitlines()
               if line.startswith("trl=="))
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", "-c", str(CPU_CONSTRAINTS),
                           "-c", str(TRL_CONSTRAINTS), trl])
    if proc.returncode:
        raise UserError(f"installing {trl} into {venv} failed (pip exit {proc.returncode}, "
                        "see above): check the network or pip's index, then re-run")
    stamp.write_text(want)
    return python


def warm_start(out: Path, cfg) -> Path:
    """The config's policy checkpoint (builtin:tiny-arithmetic) exported to HF, once."""
    from megatron_sppo.demo.builtin import clean_env, resolve_builtin

    hf = out / "warm_start_hf"
    if not (hf / "config.json").is_file():
        megatron = resolve_builtin(cfg.policy.checkpoint)
        subprocess.run([sys.executable, "-m", "megatron_sppo", "convert", "megatron-to-hf",
                        "--megatron-path", megatron, "--hf-path", str(hf), "--overwrite",
                        "--no-progress"], check=True, env=clean_env())
    return hf


def run_config(args, system: str, seed: int, hf: Path) -> tuple[list[str], object]:
    """The megatron_sppo overrides of a system (GRPO's also define TRL's settings) and the
    resolved config."""
    from megatron_sppo.config import load_config

    method = "sppo" if system == "sppo" else "grpo"
    overrides = [*METHODS[method], f"policy.checkpoint={hf}", f"trainer.seed={seed}",
                 f"trainer.total_steps={args.max_steps}",
                 f"trainer.max_train_seconds={args.max_train_seconds}",
                 "trainer.eval_before=true", f"trainer.eval_interval={args.eval_interval}",
                 "trainer.save_interval=0", f"data.eval_size={args.eval_size}",
                 f"trainer.eval_samples={args.eval_samples}", "trainer.progress=false",
                 *(["reward.workers=1"] if args.quick else [])]
    return overrides, load_config(Path(args.config), overrides)


# ---- TRL's settings from ours --------------------------------------------------------------

def updates_per_step(cfg) -> int:
    """Optimizer steps on each batch of samples: PPO epochs x mini-batches."""
    t = cfg.trainer
    return t.ppo_epochs * t.prompts_per_step // (t.mini_batch_size or t.prompts_per_step)


def grpo_config(cfg, args) -> dict:
    """GRPOConfig keywords matching megatron_sppo's GRPO run wherever TRL has the knob; the
    rest are TRL's defaults (loss ``dapo``, ``scale_rewards: group``), written out. One
    generation batch of prompts x n samples is consumed in mini-batches of the same size as
    megatron_sppo's (``steps_per_generation`` of them), ``num_iterations`` times."""
    p, r, a, t = cfg.policy, cfg.rollout, cfg.algorithm, cfg.trainer
    mini = t.mini_batch_size or t.prompts_per_step
    return dict(
        seed=t.seed, data_seed=t.seed, learning_rate=p.lr, adam_beta1=p.adam_beta1,
        adam_beta2=p.adam_beta2, adam_epsilon=p.adam_eps, weight_decay=p.weight_decay,
        max_grad_norm=p.clip_grad, lr_scheduler_type=p.lr_decay_style,
        warmup_steps=p.lr_warmup_steps, per_device_train_batch_size=mini * r.n,
        gradient_accumulation_steps=1, steps_per_generation=t.prompts_per_step // mini,
        num_generations=r.n, max_completion_length=r.max_response_length,
        temperature=r.temperature, top_p=r.top_p, top_k=max(r.top_k, 0), beta=a.kl_coef,
        num_iterations=t.ppo_epochs, epsilon=a.eps_low, epsilon_high=a.eps_high,
        loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=not a.truncated_in_loss, shuffle_dataset=False, bf16=False,
        gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=10, dataloader_num_workers=0,
        max_steps=args.max_steps * updates_per_step(cfg))


# TRL's loss_type in megatron_sppo's algorithm.loss_agg_mode terms (TRL's grpo_trainer.py)
TRL_LOSS = {"dapo": "token-mean", "bnpo": "token-mean per micro-batch",
            "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum / max length"}


def compared_settings(trl: dict, cfg) -> list[tuple[str, object, object]]:
    """(setting, TRL, megatron_sppo GRPO) for every knob that matters to both, each side
    written in the same terms, so that unequal values are real differences."""
    p, r, a, t = cfg.policy, cfg.rollout, cfg.algorithm, cfg.trainer
    mini = t.mini_batch_size or t.prompts_per_step
    single = t.ppo_epochs == 1 and mini == t.prompts_per_step and not a.kl_in_reward
    trl_single = (trl["num_iterations"] == 1
                  and trl["steps_per_generation"] == trl["gradient_accumulation_steps"])
    return [
        ("learning rate", trl["learning_rate"], p.lr),
        ("LR schedule, warm-up steps", (trl["lr_scheduler_type"], trl["warmup_steps"]),
         (p.lr_decay_style, p.lr_warmup_steps)),
        ("optimizer", f"torch AdamW ({trl['optim']})",
         "torch AdamW (megatron-core's optimizer without Apex/TE)"),
        ("Adam beta1, beta2, eps", (trl["adam_beta1"], trl["adam_beta2"], trl["adam_epsilon"]),
         (p.adam_beta1, p.adam_beta2, p.adam_eps)),
        ("weight decay", trl["weight_decay"], p.weight_decay),
        ("gradient clip (global norm)", trl["max_grad_norm"], p.clip_grad),
        ("prompts x samples per step", (trl["generation_batch_size"] // trl["num_generations"],
                                        trl["num_generations"]), (t.prompts_per_step, r.n)),
        ("optimizer steps per batch", trl["num_iterations"] * trl["steps_per_generation"]
         // trl["gradient_accumulation_steps"], updates_per_step(cfg)),
        ("mini-batch rows", "shuffled rows (TRL)" if trl["steps_per_generation"] > 1
         else "the whole batch", "a prompt's samples together" if mini < t.prompts_per_step
         else "the whole batch"),
        ("sampling temperature, top-p, top-k", (trl["temperature"], trl["top_p"],
                                                 trl["top_k"] or "off"),
         (r.temperature, r.top_p, r.top_k if r.top_k > 0 else "off")),
        ("max response tokens", trl["max_completion_length"], r.max_response_length),
        ("advantage", f"(R - group mean) / (group std + 1e-4) (scale_rewards="
         f"{trl['scale_rewards']})", "(R - group mean) / (group std + 1e-6)"),
        (f"loss aggregation (TRL loss_type={trl['loss_type']})",
         TRL_LOSS.get(trl["loss_type"], trl["loss_type"]), a.loss_agg_mode),
        ("ratio clip low, high", (trl["epsilon"], trl["epsilon_high"]),
         (a.eps_low, a.eps_high)),
        ("dual clip (inactive while the ratio is 1)", trl["delta"], a.dual_clip),
        ("KL coefficient", trl["beta"], a.kl_coef + a.kl_in_reward),
        ("entropy bonus", trl["entropy_coef"], a.entropy_coef),
        ("truncated responses: reward, in the loss",
         (0.0, not trl["mask_truncated_completions"]),
         (a.truncated_reward, a.truncated_in_loss)),
        ("old log-probs", "the update's own forward" if trl_single else "a forward pass",
         "the update's own forward" if single and a.old_logprobs == "policy"
         else "a forward pass" if a.old_logprobs == "policy" else "the rollout engine's"),
        ("precision", "bfloat16 autocast" if trl["bf16"] else "float16 autocast"
         if trl["fp16"] else "float32", p.params_dtype),
        ("activation recompute", bool(trl["gradient_checkpointing"]),
         bool(p.recompute_granularity)),
        ("prompt order", "megatron_sppo's" if not trl["shuffle_dataset"] else "TRL's shuffle",
         "megatron_sppo's"),
        ("generation", "transformers generate", f"{r.engine} engine (transformers model)"),
        ("seed", trl["seed"], t.seed),
    ]


def differing(rows: list[tuple[str, object, object]]) -> list[str]:
    return [name for name, theirs, ours in rows if theirs != ours]


# ---- runs ---------------------------------------------------------------------------------

def run_megatron(args, system: str, seed: int, hf: Path, out: Path) -> dict:
    overrides, _ = run_config(args, system, seed, hf)
    rows = train_run(Path(args.config), out, overrides)
    steps = [{"step": r["step"], "seconds": sum(v for k, v in r.items() if k.startswith("time_")),
              "tokens": r["generated_tokens"],
              **{k: v for k, v in r.items() if k.startswith("time_")}}
             for r in rows if r["step"] > 0]
    return {"steps": steps, "points": eval_points(rows),
            "settings": (out / "config.yaml").read_text()}


def trl_prompts(cfg, hf: Path, steps: int, path: Path) -> None:
    """The prompts megatron_sppo's GRPO run draws, in its order, one per line with their
    token ids (TRL checks that it renders the same)."""
    from transformers import AutoTokenizer

    from megatron_sppo.data.prompts import chat_prompt_ids
    from megatron_sppo.trainer.sources import build_prompt_source

    tokenizer = AutoTokenizer.from_pretrained(hf)
    records = build_prompt_source(cfg, tokenizer).next_batch(steps * cfg.trainer.prompts_per_step)
    lines = [json.dumps({"prompt": r.prompt, "answer": r.ground_truth,
                         "prompt_ids": chat_prompt_ids(tokenizer, r.prompt)}) for r in records]
    write_text_atomic(path, "\n".join(lines) + "\n")


def run_trl(args, seed: int, hf: Path, out: Path, python: Path) -> dict:
    from megatron_sppo.demo.builtin import clean_env

    _, cfg = run_config(args, "trl_grpo", seed, hf)
    out.mkdir(parents=True, exist_ok=True)
    # enough prompts for any run in the budget (TRL stops on the training seconds)
    trl_prompts(cfg, hf, min(args.max_steps, 2500), out / "prompts.jsonl")
    job = {"model": str(hf), "prompts": str(out / "prompts.jsonl"), "output_dir": str(out),
           "seed": seed, "max_train_seconds": args.max_train_seconds,
           "eval_interval": args.eval_interval, "updates_per_step": updates_per_step(cfg),
           "grpo_config": grpo_config(cfg, args)}
    write_text_atomic(out / "job.json", json.dumps(job, indent=1))
    print(f"\n$ {python} tools/trl_grpo_worker.py {out / 'job.json'}", flush=True)
    proc = subprocess.run([str(python), str(REPO / "tools" / "trl_grpo_worker.py"),
                           str(out / "job.json")], env=clean_env())
    if proc.returncode:
        raise UserError(f"the TRL run {out.name} failed (exit {proc.returncode}): see above")
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return {"steps": steps, "points": score_trl(cfg, hf, out, steps),
            "settings": json.loads((out / "settings.json").read_text())}


def score_trl(cfg, hf: Path, out: Path, steps: list[dict]) -> list[dict]:
    """TRL's checkpoints (and the shared warm start as step 0) through megatron_sppo's
    held-out evaluator, with the seeds megatron_sppo's in-loop evaluation uses."""
    from transformers import AutoTokenizer

    from megatron_sppo.data.prompts import chat_prompt_ids
    from megatron_sppo.rollout.local import LocalEngine
    from megatron_sppo.trainer.evaluation import eval_seed, sample_and_score
    from megatron_sppo.trainer.sources import build_scorer, load_records

    records = load_records(cfg, cfg.data.eval_files, "eval")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = [chat_prompt_ids(tokenizer, r.prompt) for r in records]
    scorer = build_scorer(cfg)
    checkpoints = {0: hf, **{int(p.name.split("_")[1]): p
                             for p in (out / "checkpoints").glob("step_*")}}
    seconds = tokens = 0.0
    totals = {0: (0.0, 0.0)}
    for s in steps:
        seconds, tokens = seconds + s["seconds"], tokens + s["tokens"]
        totals[s["step"]] = (seconds, tokens)
    points = []
    try:
        for step in sorted(checkpoints):
            engine = LocalEngine(checkpoints[step], load_weights=True)
            result = sample_and_score(engine, scorer, records, ids, cfg.rollout,
                                      cfg.trainer.eval_samples, seed=eval_seed(cfg, step))
            result.pop("outcomes")
            points.append({"step": step, "seconds": totals[step][0], "tokens": totals[step][1],
                           **result})
    finally:
        scorer.close()
    return points


def run_system(args, system: str, seed: int, hf: Path, trl_python: Path | None) -> dict:
    out = Path(args.output_dir) / f"{system}_seed{seed}"
    done = out / "benchmark_run.json"
    if done.is_file():
        return json.loads(done.read_text())
    if system == "trl_grpo":
        result = run_trl(args, seed, hf, out, trl_python)
    else:
        result = run_megatron(args, system, seed, hf, out)
    write_text_atomic(done, json.dumps(result))
    return result


# ---- report -------------------------------------------------------------------------------

def pass1_at_tokens(points: list[dict], tokens: float) -> float | None:
    """Held-out pass@1 at ``tokens`` generated tokens, linear between evaluations."""
    for a, b in zip(points, points[1:]):
        if a["tokens"] <= tokens <= b["tokens"]:
            w = (tokens - a["tokens"]) / max(b["tokens"] - a["tokens"], 1e-9)
            return a["pass1_sampled"] + w * (b["pass1_sampled"] - a["pass1_sampled"])
    return None


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.mean(got) if got else None


def _fmt(value: float | None, spec: str, runs: int, got: int) -> str:
    if value is None:
        return "not reached"
    return format(value, spec) + ("" if got == runs else f" ({got}/{runs} seeds)")


def summarize(runs: dict, args) -> dict:
    """Per system, means over seeds of what the table shows."""
    out = {}
    for system, per_seed in runs.items():
        steps = [s for r in per_seed.values() for s in r["steps"]]
        phases = sorted({k for s in steps for k in s if k.startswith("time_")})
        stats = {"median_step": statistics.median(s["seconds"] for s in steps) if steps else None,
                 "phases": {k[5:]: statistics.median(s.get(k, 0.0) for s in steps)
                            for k in phases},
                 "runs": len(per_seed)}
        for key, fn in (("steps", lambda r: r["steps"][-1]["step"] if r["steps"] else 0),
                        ("pass1_at_tokens", lambda r: pass1_at_tokens(r["points"], args.tokens_at)),
                        ("tokens_to_target",
                         lambda r: reaching(r["points"], "tokens", args.target)),
                        ("seconds_to_target",
                         lambda r: reaching(r["points"], "seconds", args.target)),
                        ("peak", lambda r: max(p["pass1_sampled"] for p in r["points"]))):
            values = [fn(r) for r in per_seed.values()]
            stats[key], stats[key + "_seeds"] = _mean(values), sum(v is not None for v in values)
        out[system] = stats
    return out


def table(summary: dict, args) -> str:
    target = f"{args.target:.0%}"
    lines = [f"| system | median step (s) | phases, median (s) | steps in "
             f"{args.max_train_seconds:g} s | held-out sampled pass@1 after "
             f"{args.tokens_at / 1e3:g}k generated tokens | generated tokens to {target} | "
             f"training s to {target} | peak pass@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for system, s in summary.items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in s["phases"].items())
        n = s["runs"]
        lines.append(
            f"| {LABELS[system]} | {_fmt(s['median_step'], '.3f', 1, 1)} | {phases} | "
            f"{_fmt(s['steps'], '.0f', 1, 1)} | "
            f"{_fmt(s['pass1_at_tokens'], '.3f', n, s['pass1_at_tokens_seeds'])} | "
            f"{_fmt(s['tokens_to_target'], '.3g', n, s['tokens_to_target_seeds'])} | "
            f"{_fmt(s['seconds_to_target'], '.1f', n, s['seconds_to_target_seeds'])} | "
            f"{_fmt(s['peak'], '.3f', n, s['peak_seeds'])} |")
    return "\n".join(lines) + "\n"


def targets(summary: dict) -> str:
    """The comparison's three targets, each as measured here."""
    def get(system, key):
        return summary.get(system, {}).get(key)

    lines = []
    trl, grpo, sppo = (get(s, "median_step") for s in SYSTEMS)
    if trl and grpo:
        lines.append(f"- megatron_sppo GRPO median step / TRL GRPO's: {grpo / trl:.2f} "
                     f"(target <= 1): {'met' if grpo <= trl else 'NOT met'}")
    if grpo and sppo:
        lines.append(f"- SPPO median step / megatron_sppo GRPO's: {sppo / grpo:.2f} "
                     f"(target <= 1.05): {'met' if sppo <= 1.05 * grpo else 'NOT met'}")
    if "trl_grpo" in summary and "sppo" in summary:
        t_trl, t_sppo = get("trl_grpo", "seconds_to_target"), get("sppo", "seconds_to_target")
        reached = {s: (get(s, "seconds_to_target_seeds"), get(s, "runs"))
                   for s in ("trl_grpo", "sppo")}
        met = (reached["sppo"][0] == reached["sppo"][1] and t_sppo is not None
               and (t_trl is None or reached["trl_grpo"][0] < reached["trl_grpo"][1]
                    or t_sppo < t_trl))
        lines.append(f"- training s to the target, mean over seeds: SPPO "
                     f"{_fmt(t_sppo, '.1f', *reached['sppo'][::-1])}, TRL GRPO "
                     f"{_fmt(t_trl, '.1f', *reached['trl_grpo'][::-1])} "
                     f"(target: SPPO first): {'met' if met else 'NOT met'}")
    return "\n".join(lines) + "\n"


def settings_report(runs: dict, args, hf: Path) -> str:
    """Both sides' full settings and the list of what differs (first seed's runs)."""
    seed = args.seeds[0]
    _, cfg = run_config(args, "grpo", seed, hf)
    parts = []
    if "trl_grpo" in runs:
        trl = runs["trl_grpo"][seed]["settings"]
        rows = compared_settings(trl, cfg)
        parts += ["| setting | TRL GRPOTrainer | megatron_sppo GRPO |", "|---|---|---|",
                  *[f"| {n} | {a} | {b} |" for n, a, b in rows], "",
                  "Settings that differ: " + "; ".join(differing(rows)), "",
                  "TRL GRPOConfig (full):", "```", json.dumps(trl, indent=1), "```"]
    for system in ("grpo", "sppo"):
        if system in runs:
            parts += [f"{LABELS[system]} config (full):", "```",
                      runs[system][seed]["settings"].rstrip(), "```"]
    return "\n".join(parts) + "\n"


def benchmark(args: argparse.Namespace) -> None:
    from megatron_sppo.config import load_config

    if args.quick:
        args.seeds, args.max_steps, args.eval_interval = args.seeds[:1], 2, 2
        args.eval_size, args.eval_samples = 8, 2
    out = Path(args.output_dir).resolve()
    args.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = warm_start(out, load_config(Path(args.config), []))
    python = ensure_trl_venv(Path(args.trl_venv)) if "trl_grpo" in args.systems else None
    runs = {s: {} for s in args.systems}
    for seed in args.seeds:
        for system in args.systems:
            runs[system][seed] = run_system(args, system, seed, hf, python)
    summary = summarize(runs, args)
    report = (table(summary, args) + "\n" + targets(summary) + "\n"
              + settings_report(runs, args, hf))
    write_text_atomic(out / "benchmark.json", json.dumps(
        {"args": vars(args), "summary": summary, "runs": runs}, indent=1, default=str) + "\n")
    write_text_atomic(out / "benchmark.md", report)
    plot({LABELS[s]: {seed: {"points": r["points"]} for seed, r in per_seed.items()}
          for s, per_seed in runs.items()}, "demo", args.target, out / "benchmark.png",
         title="megatron_sppo vs TRL's GRPOTrainer on the demo arithmetic task")
    print("\n" + report)
    print(out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_tool(benchmark, build_parser().parse_args()))
