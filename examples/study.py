#!/usr/bin/env python
"""SPPO against the baselines on the CPU demo task: our small-scale check of the paper's
efficiency claim.

    python examples/study.py --output-dir outputs/study            # ~40 min on 2 cores

Every method starts from the same warm-started tiny model (builtin:tiny-arithmetic), sees the
same prompt stream (per seed) and generates 64 responses per step, which it learns from in 4
PPO mini-batches (the config's 16 prompts; 2 prompts x 8 for the n = 8 methods); each run stops
when its training time (the whole step, evaluation excluded) reaches --max-train-seconds.
Methods:

  sppo               SPPO (n=1): A = R - V(prompt), learned prompt-only critic
  sppo_running_mean  the ablation: V = running mean of past success rates (no critic)
  grpo               GRPO, n=8 x 8 prompts, group mean/std
  ppo_gae            token-level PPO: token critic, GAE (gamma = lambda = 1), 10 warm-up steps
  rloo               RLOO, n=8 x 8 prompts, KL in reward 0.001 (the paper uses n=5)
  remax              ReMax, n=1 + a greedy baseline response, KL in reward 0.001

Writes study.json (every evaluation point), study.md (peak held-out accuracy, time and
generated tokens to reach --target, per method: mean and spread over seeds) and study.png
(held-out sampled pass@1 against training seconds and against generated tokens). Runs
already complete in --output-dir are reused, so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.demo.run import REPO_CONFIG, eval_points, train_run  # noqa: E402
from megatron_sppo.fileio import save_figure_atomic, write_text_atomic  # noqa: E402

METHODS = {
    "sppo": [],
    "sppo_running_mean": ["algorithm.sppo_baseline=running_mean"],
    "grpo": ["algorithm.estimator=grpo", "rollout.n=8", "trainer.prompts_per_step=8",
             "trainer.mini_batch_size=2"],
    "ppo_gae": ["algorithm.estimator=gae", "critic.warmup_steps=10"],
    "rloo": ["algorithm.estimator=rloo", "rollout.n=8", "trainer.prompts_per_step=8",
             "trainer.mini_batch_size=2", "algorithm.kl_in_reward=0.001"],
    "remax": ["algorithm.estimator=remax", "algorithm.kl_in_reward=0.001"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max-train-seconds", type=float, default=75.0)
    p.add_argument("--eval-interval", type=int, default=15)
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per problem")
    p.add_argument("--target", type=float, default=0.65,
                   help="held-out sampled pass@1 for time/tokens-to-target")
    p.add_argument("--config", default=str(REPO_CONFIG))
    return p


def run_one(args, method: str, seed: int) -> list[dict]:
    out = Path(args.output_dir) / f"{method}_seed{seed}"
    done = out / "study_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    rows = train_run(Path(args.config), out, [
        *METHODS[method], f"trainer.seed={seed}", "trainer.total_steps=100000",
        f"trainer.max_train_seconds={args.max_train_seconds}", "trainer.eval_before=true",
        f"trainer.eval_interval={args.eval_interval}", "trainer.save_interval=0",
        f"data.eval_size={args.eval_size}", f"trainer.eval_samples={args.eval_samples}",
        "trainer.progress=false"])
    points = eval_points(rows)
    write_text_atomic(done, json.dumps(points))
    return points


def first_reaching(points: list[dict], key: str, target: float) -> float | None:
    return next((p[key] for p in points if p["pass1_sampled"] >= target), None)


def _stat(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = f"{statistics.mean(got):.3g}"
    if len(got) > 1:
        text += f" ± {statistics.stdev(got):.2g}"
    return text + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds)")


def table(results: dict, target: float) -> str:
    lines = [f"| method | peak held-out pass@1 (sampled) | final pass@1 (greedy) | training s "
             f"to {target:.0%} | generated tokens to {target:.0%} | steps | generated tokens |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        peak = [max(p["pass1_sampled"] for p in pts) for pts in runs.values()]
        greedy = [pts[-1]["pass1_greedy"] for pts in runs.values()]
        secs = [first_reaching(pts, "seconds", target) for pts in runs.values()]
        toks = [first_reaching(pts, "tokens", target) for pts in runs.values()]
        steps = [pts[-1]["step"] for pts in runs.values()]
        total = [pts[-1]["tokens"] for pts in runs.values()]
        lines.append(f"| {method} | {_stat(peak)} | {_stat(greedy)} | {_stat(secs)} | "
                     f"{_stat(toks)} | {_stat(steps)} | {_stat(total)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path,
         title: str = "SPPO vs baselines on the built-in arithmetic task") -> None:
    """Held-out sampled pass@1 against training seconds and generated tokens; ``results``:
    {label: {seed: evaluation points}} (also tools/benchmark_vs_trl.py's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (method, runs), color in zip(results.items(), plt.rcParams["axes.prop_cycle"]):
        for i, pts in enumerate(runs.values()):
            for ax, x in ((axes[0], "seconds"), (axes[1], "tokens")):
                ax.plot([p[x] for p in pts], [p["pass1_sampled"] for p in pts], "-",
                        color=color["color"], alpha=0.8, label=method if i == 0 else None)
    axes[0].set_xlabel("training seconds (2 CPU cores; evaluation excluded)")
    axes[1].set_xlabel("generated response tokens")
    axes[1].xaxis.set_major_formatter(lambda x, _: f"{x / 1e3:.0f}k")
    for ax in axes:
        ax.set_ylabel("held-out pass@1 (sampled)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (one line per seed)")
    save_figure_atomic(fig, path)


def study(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {m: {s: run_one(args, m, s) for s in args.seeds} for m in args.methods}
    write_text_atomic(out / "study.json", json.dumps(
        {"args": vars(args), "results": results}, indent=1) + "\n")
    md = table(results, args.target)
    write_text_atomic(out / "study.md", md)
    plot(results, out / "study.png")
    print("\n" + md)
    print(out.resolve())


if __name__ == "__main__":
    sys.exit(run_tool(study, build_parser().parse_args()))
