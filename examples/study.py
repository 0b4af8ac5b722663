#!/usr/bin/env python
"""SPPO against the baselines on the CPU arithmetic tasks: our small-scale check of the paper's
efficiency claim, and of whether the critic pays for itself by choosing prompts.

    python examples/study.py --output-dir outputs/study --docs-dir docs   # 50 min, 2 cores

30 runs (2 tasks x 5 methods x 3 seeds) of --max-train-seconds=70 each, plus start-up and
evaluations: 100 s a run on two idle cores (measured), and 3.5 min more if the
warm-started model is not cached yet. A line before
and after each run shows where the study is and the time left.

Every method starts from the same warm-started tiny model (builtin:tiny-arithmetic), sees the
same prompt stream (per seed) and trains on 64 responses per step; each run stops when its
training time (selection + rollout + reward + critic + policy + sync, evaluation excluded)
reaches --max-train-seconds. Tasks (``data.arithmetic_task``):

  demo    the demo's four levels: one-digit chains of 3, 4 and 5 numbers, two two-digit ones
  graded  eight levels (megatron_sppo/data/arithmetic.py): one-digit chains of 3 and 5
          numbers, a two-digit number from 10-19, 20-29, 30-39, 40-49 or 50-99 plus or minus
          a one-digit one, and two two-digit numbers; held-out sampled pass@1 at the warm
          start runs from 63% down to 1-12% for the last six, which RL makes learnable one
          after another (10-29 first, 30-39 later) or not at all

Methods (--methods; the first five by default):

  sppo                   SPPO (n=1): A = R - V(prompt), learned prompt-only critic
  sppo_selection         SPPO choosing its 64 prompts of a pool of 256 by the critic
                         (algorithm.prompt_selection; the rule's defaults)
  sppo_running_mean      the ablation: V = running mean of past success rates (no critic)
  grpo                   GRPO, n=8 x 8 prompts, group mean/std
  grpo_dynamic_sampling  GRPO with DAPO's dynamic sampling (groups with equal rewards
                         dropped and replaced; every generated token counted)
  ppo_gae                token-level PPO: token critic, GAE (gamma = lambda = 1), 10 warm-up steps
  rloo                   RLOO, n=8 x 8 prompts, KL in reward 0.001 (the paper uses n=5)
  remax                  ReMax, n=1 + a greedy baseline response, KL in reward 0.001
  sppo_32, sppo_selection_32   SPPO and SPPO + selection at 32 prompts (responses) a step

Writes into --output-dir: study.json (every evaluation point, per-run means of the selection
and dynamic-sampling metrics), study.md (per task: peak held-out accuracy, time and generated
tokens to reach the task's target, mean and spread over seeds; the targets of issue 18; the
critic's ranking of prompts) and study_<task>.png (held-out sampled and greedy pass@1 against
training seconds and against generated tokens); with --docs-dir the same study.md and figures
go there too. Runs already complete in --output-dir are reused, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.demo.run import (REPO_CONFIG, eval_points, machine_description,  # noqa: E402
                                    train_run)
from megatron_sppo.fileio import save_figure_atomic, write_text_atomic  # noqa: E402

# 8 prompts x 8 responses, learnt from in four mini-batches of 2 prompts as the demo config's
# 64 x 1 in four of 16
GROUP = ["rollout.n=8", "trainer.prompts_per_step=8", "trainer.mini_batch_size=2"]
METHODS = {
    "sppo": [],
    "sppo_selection": ["algorithm.prompt_selection=true"],
    "sppo_running_mean": ["algorithm.sppo_baseline=running_mean"],
    "grpo": ["algorithm.estimator=grpo", *GROUP],
    "grpo_dynamic_sampling": ["algorithm.estimator=grpo", *GROUP,
                              "algorithm.dynamic_sampling=true"],
    "ppo_gae": ["algorithm.estimator=gae", "critic.warmup_steps=10"],
    "rloo": ["algorithm.estimator=rloo", *GROUP, "algorithm.kl_in_reward=0.001"],
    "remax": ["algorithm.estimator=remax", "algorithm.kl_in_reward=0.001"],
    "sppo_32": ["trainer.prompts_per_step=32"],
    "sppo_selection_32": ["algorithm.prompt_selection=true", "trainer.prompts_per_step=32"],
}
DEFAULT_METHODS = ["sppo", "sppo_selection", "sppo_running_mean", "grpo",
                   "grpo_dynamic_sampling"]
TASKS = {"demo": [], "graded": ["data.arithmetic_task=graded"]}
TARGETS = {"demo": 0.65, "graded": 0.35}
# per-run means of these step metrics go into study.json
RUN_MEANS = ("selection_", "dynamic_sampling_", "time_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--docs-dir", help="also write study.md and the figures here (e.g. docs)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max-train-seconds", type=float, default=70.0)
    p.add_argument("--eval-interval", type=int, default=15)
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per problem")
    for task, target in TARGETS.items():
        p.add_argument(f"--target-{task}", type=float, default=target,
                       help=f"held-out sampled pass@1 for time/tokens-to-target on {task}")
    p.add_argument("--config", default=str(REPO_CONFIG))
    return p


def run_one(args, task: str, method: str, seed: int) -> dict:
    out = Path(args.output_dir) / task / f"{method}_seed{seed}"
    done = out / "study_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    rows = train_run(Path(args.config), out, [
        *TASKS[task], *METHODS[method], f"trainer.seed={seed}", "trainer.total_steps=100000",
        f"trainer.max_train_seconds={args.max_train_seconds}", "trainer.eval_before=true",
        f"trainer.eval_interval={args.eval_interval}", "trainer.save_interval=0",
        f"data.eval_size={args.eval_size}", f"trainer.eval_samples={args.eval_samples}",
        "trainer.progress=false", "trainer.tensorboard=false"])
    result = {"points": eval_points(rows), "means": run_means(rows)}
    write_text_atomic(done, json.dumps(result))
    return result


def run_means(rows: list[dict]) -> dict:
    """Means over a run's steps of the selection, dynamic-sampling and phase-time metrics."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(RUN_MEANS) and isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    return {k: statistics.mean(v) for k, v in sums.items()}


def reaching(points: list[dict], key: str, target: float) -> float | None:
    """``key`` (seconds or tokens) where held-out sampled pass@1 first reaches ``target``,
    linearly interpolated between the two evaluations around the crossing."""
    for before, after in zip(points, points[1:]):
        if after["pass1_sampled"] >= target > before["pass1_sampled"]:
            frac = ((target - before["pass1_sampled"])
                    / (after["pass1_sampled"] - before["pass1_sampled"]))
            return before[key] + frac * (after[key] - before[key])
    if points and points[0]["pass1_sampled"] >= target:
        return points[0][key]
    return None


def _stat(values: list[float | None], missing: str = "not reached") -> str:
    got = [v for v in values if v is not None and v == v]
    if not got:
        return missing
    text = f"{statistics.mean(got):.3g}"
    if len(got) > 1:
        text += f" ± {statistics.stdev(got):.2g}"
    return text + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds)")


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.mean(got) if len(got) == len(values) and got else None


def table(runs_by_method: dict, target: float) -> str:
    lines = [f"| method | peak held-out pass@1 (sampled) | final pass@1 (greedy) | training s "
             f"to {target:.0%} | generated tokens to {target:.0%} | steps | generated tokens |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in runs_by_method.items():
        pts = [r["points"] for r in runs.values()]
        peak = [max(p["pass1_sampled"] for p in x) for x in pts]
        greedy = [x[-1]["pass1_greedy"] for x in pts]
        secs = [reaching(x, "seconds", target) for x in pts]
        toks = [reaching(x, "tokens", target) for x in pts]
        steps = [x[-1]["step"] for x in pts]
        total = [x[-1]["tokens"] for x in pts]
        lines.append(f"| {method} | {_stat(peak)} | {_stat(greedy)} | {_stat(secs)} | "
                     f"{_stat(toks)} | {_stat(steps)} | {_stat(total)} |")
    return "\n".join(lines) + "\n"


def targets(runs_by_method: dict, target: float) -> str:
    """Issue 18's targets: SPPO + selection to the target with <= 0.7x the generated tokens
    of SPPO and <= 0.6x those of GRPO + dynamic sampling, and no later in seconds."""
    if "sppo_selection" not in runs_by_method:
        return ""

    def mean_to(method, key):
        runs = runs_by_method.get(method)
        return None if runs is None else _mean([reaching(r["points"], key, target)
                                                for r in runs.values()])

    mine = {k: mean_to("sppo_selection", k) for k in ("tokens", "seconds")}
    lines = []
    for other, bound in (("sppo", 0.7), ("grpo_dynamic_sampling", 0.6)):
        theirs = {k: mean_to(other, k) for k in ("tokens", "seconds")}
        if other not in runs_by_method:
            continue
        if None in (*mine.values(), *theirs.values()):
            lines.append(f"- against {other}: not measurable (a method missed the target "
                         "on some seed)")
            continue
        ratio = mine["tokens"] / theirs["tokens"]
        met = ratio <= bound and mine["seconds"] <= theirs["seconds"]
        lines.append(f"- against {other}: {ratio:.2f}x the generated tokens (target <= "
                     f"{bound}x), {mine['seconds']:.1f} s against {theirs['seconds']:.1f} s "
                     f"of training: {'met' if met else 'not met'}")
    return "\n".join(lines) + "\n"


def critic_table(runs_by_method: dict) -> str:
    """The critic as a ranker of prompts (selection runs: last evaluation; training means)."""
    rows = []
    for method, runs in runs_by_method.items():
        last = [r["points"][-1] for r in runs.values()]
        means = [r["means"] for r in runs.values()]
        if "selection_signal_auc" not in last[0]:
            continue

        def m(key, src):
            return _stat([x.get(key) for x in src], missing="n/a")

        rows.append(f"| {method} | {m('selection_signal_auc', last)} | "
                    f"{m('selection_too_hard_right', last)} | "
                    f"{m('selection_too_easy_right', last)} | "
                    f"{m('selection_value_chosen', means)} | "
                    f"{m('selection_value_skipped', means)} | "
                    f"{m('selection_skipped_too_hard', means)} | "
                    f"{m('selection_skipped_too_easy', means)} | "
                    f"{m('selection_critic_seconds', means)} |")
    if not rows:
        return ""
    return "\n".join(["| method | signal AUC (held-out) | V < floor: all k failed | V > ceiling: "
                      "all k solved | mean V chosen | mean V skipped | pool skipped too hard | "
                      "pool skipped too easy | pool forward s |",
                      "|---|---|---|---|---|---|---|---|---|", *rows]) + "\n"


def _curves(axes_of, runs_by_method: dict, y_of, x_keys) -> None:
    """One line per seed, a colour per method: axes_of(y, x) -> the axes to draw on."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (method, runs), color in zip(runs_by_method.items(), colors):
        for i, r in enumerate(runs.values()):
            pts = r["points"]
            for y in y_of(pts[0]):
                for x in x_keys:
                    axes_of(y, x).plot([p[x] for p in pts], [p[y] for p in pts], "-",
                                       color=color, alpha=0.8,
                                       label=method if i == 0 else None)


def plot(runs_by_method: dict, task: str, target: float, path: Path,
         title: str | None = None) -> None:
    """Held-out sampled and greedy pass@1 against training seconds and generated tokens
    (also tools/benchmark_vs_trl.py's figure, with its own ``title``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    rows, cols = ("pass1_sampled", "pass1_greedy"), ("seconds", "tokens")
    _curves(lambda y, x: axes[rows.index(y), cols.index(x)], runs_by_method,
            lambda _: rows, cols)
    for row, y in enumerate(("sampled", "greedy")):
        axes[row, 0].set_ylabel(f"held-out pass@1 ({y})")
        axes[row, 0].set_xlabel("training seconds (2 CPU cores; evaluation excluded)")
        axes[row, 1].set_xlabel("generated response tokens (dropped ones included)")
        axes[row, 1].xaxis.set_major_formatter(lambda x, _: f"{x / 1e3:.0f}k")
    for ax in axes[0]:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    title = title or f"SPPO vs baselines on the {task} arithmetic task"
    fig.suptitle(f"{title} (one line per seed; dashed: the target)")
    save_figure_atomic(fig, path)


def plot_levels(runs_by_method: dict, task: str, path: Path) -> None:
    """Held-out sampled pass@1 of each difficulty level against generated tokens: which
    levels RL makes learnable, and when."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(next(iter(runs_by_method.values())).values()))["points"][0]
    levels = sorted((k for k in first if k.startswith("pass1_sampled/level_")),
                    key=lambda k: int(k.rsplit("_", 1)[1]))
    cols = 4
    fig, axes = plt.subplots(-(-len(levels) // cols), cols, figsize=(14, 3.2 * -(-len(levels)
                                                                               // cols)),
                             sharex=True, squeeze=False)
    _curves(lambda y, x: axes.flat[levels.index(y)], runs_by_method, lambda _: levels,
            ("tokens",))
    for ax, key in zip(axes.flat, levels):
        ax.set_title(f"level {key.rsplit('_', 1)[1]}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e3:.0f}k")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("generated response tokens")
    fig.supylabel("held-out pass@1 (sampled)")
    fig.suptitle(f"Per level, {task} task (one line per seed)")
    save_figure_atomic(fig, path)


def report(args, results: dict, wall: float) -> str:
    parts = [f"# Study: SPPO, prompt selection and the baselines at CPU scale\n",
             f"`python examples/study.py {' '.join(sys.argv[1:])}`: {len(args.seeds)} seeds, "
             f"{args.max_train_seconds:g} s of training per run, held-out evaluation on "
             f"{args.eval_size} problems x {args.eval_samples} samples every "
             f"{args.eval_interval} steps; {machine_description()}; {wall / 60:.0f} min in "
             "all. Mean ± standard deviation over seeds; time and tokens to the target are "
             "interpolated between the evaluations around the crossing.\n"]
    for task, runs_by_method in results.items():
        target = getattr(args, f"target_{task}")
        parts += [f"## Task: {task} (target {target:.0%} held-out sampled pass@1)\n",
                  table(runs_by_method, target), f"![{task}](study_{task}.png)\n",
                  f"![{task} per level](study_{task}_levels.png)\n"]
        goals = targets(runs_by_method, target)
        if goals:
            parts += ["Targets (SPPO + selection):\n", goals]
        critic = critic_table(runs_by_method)
        if critic:
            parts += ["The critic as a ranker of prompts (held-out: last evaluation, k "
                      "samples a prompt; pool: means over the run's steps):\n", critic]
    return "\n".join(parts)


def study(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(t, m, s) for t in args.tasks for m in args.methods for s in args.seeds]
    results: dict = {t: {m: {} for m in args.methods} for t in args.tasks}
    start = time.time()
    for i, (task, method, seed) in enumerate(plan):
        elapsed = time.time() - start
        eta = f", about {elapsed / i * (len(plan) - i) / 60:.0f} min left" if i else ""
        print(f"\n[study {i + 1}/{len(plan)}] {task} {method} seed {seed} "
              f"({elapsed / 60:.1f} min{eta})", flush=True)
        result = results[task][method][seed] = run_one(args, task, method, seed)
        last = result["points"][-1]
        print(f"[study {i + 1}/{len(plan)}] done: {last['step']} steps, "
              f"{last['seconds']:.0f} s of training, {last['tokens'] / 1e3:.0f}k tokens, "
              f"held-out pass@1 {last['pass1_sampled']:.3f} sampled, "
              f"{last['pass1_greedy']:.3f} greedy", flush=True)
    wall = time.time() - start
    write_text_atomic(out / "study.json", json.dumps(
        {"args": vars(args), "results": results}, indent=1) + "\n")
    md = report(args, results, wall)
    for where in [out] + ([Path(args.docs_dir)] if args.docs_dir else []):
        where.mkdir(parents=True, exist_ok=True)
        write_text_atomic(where / "study.md", md)
        for task, runs_by_method in results.items():
            plot(runs_by_method, task, getattr(args, f"target_{task}"),
                 where / f"study_{task}.png")
            plot_levels(runs_by_method, task, where / f"study_{task}_levels.png")
    print("\n" + md)
    print(out.resolve())


if __name__ == "__main__":
    sys.exit(run_tool(study, build_parser().parse_args()))
