"""`megatron-sppo demo`: the embedded CPU demo, end to end.

Set-up (once, cached): the tiny warm-started policy ``builtin:tiny-arithmetic``. Then two
runs of ``megatron-sppo train`` with the same config, seed and step budget: SPPO, and the
control whose rewards are shuffled within each batch (same reward rate, no information about
which response earned it). Both are evaluated on held-out problems never seen in SFT or RL
(sampled pass@1 at the rollout temperature over k samples per problem, and greedy pass@1);
the SPPO run also reports how well its critic predicts per-prompt success. Writes
``summary.json``, ``summary.md`` (the before/after table) and ``learning_curve.png`` into the
output directory, whose path it prints last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from megatron_sppo.errors import UserError
from megatron_sppo.fileio import save_figure_atomic, write_text_atomic

REPO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu_sppo.yaml"


def train_run(config: Path, out: Path, overrides: list[str]) -> list[dict]:
    """One training run in a child process (it owns its process groups); its metrics."""
    cmd = [sys.executable, "-m", "megatron_sppo", "train", "--config", str(config),
           f"trainer.output_dir={out}", *overrides]
    print(f"\n$ megatron-sppo {' '.join(cmd[3:])}", flush=True)
    from megatron_sppo.demo.builtin import clean_env

    proc = subprocess.run(cmd, env=clean_env())
    if proc.returncode:
        raise UserError(f"demo run {out.name} failed (exit {proc.returncode}): see the output "
                        "above")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def eval_points(rows: list[dict]) -> list[dict]:
    """Rows that carry held-out evaluation, with the trainer's cumulative training seconds
    and the generated tokens up to that step."""
    points, tokens = [], 0.0
    for r in rows:
        tokens += r.get("generated_tokens") or 0.0
        if "eval/pass1_sampled" in r:
            points.append({"step": r["step"], "seconds": r.get("train_seconds", 0.0),
                           "tokens": tokens,
                           **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}})
    return points


def summarize(sppo: list[dict], control: list[dict]) -> dict:
    """The demo's summary from the two runs' metrics.jsonl rows."""
    points, ctrl = eval_points(sppo), eval_points(control)
    if not points or points[0]["step"] != 0 or len(points) < 2 or not ctrl:
        raise UserError("the demo runs lack held-out evaluations at step 0 and at the end: keep "
                        "trainer.eval_before=true and trainer.eval_interval dividing total_steps")
    before, after, ctrl_after = points[0], points[-1], ctrl[-1]
    return {
        "heldout_pass1_greedy_before": before["pass1_greedy"],
        "heldout_pass1_greedy_after": after["pass1_greedy"],
        "heldout_pass1_sampled_before": before["pass1_sampled"],
        "heldout_pass1_sampled_after": after["pass1_sampled"],
        "control_pass1_sampled_after": ctrl_after["pass1_sampled"],
        "control_pass1_greedy_after": ctrl_after["pass1_greedy"],
        "critic_pearson": after.get("critic_pearson"),
        "critic_auc": after.get("critic_auc"),
        "critic_brier": after.get("critic_brier"),
        "steps": after["step"],
        "train_reward_first10": _mean([r["reward_mean"] for r in sppo if r["step"] > 0][:10]),
        "train_reward_last10": _mean([r["reward_mean"] for r in sppo if r["step"] > 0][-10:]),
        "by_level": _by_level(before, after),
        "curve": _curve(points),
        "control_curve": _curve(ctrl),
    }


def _by_level(before: dict, after: dict) -> dict:
    """{level: {sampled_before, sampled_after, greedy_before, greedy_after}} of SPPO."""
    out = {}
    for key in sorted(k for k in after if "/level_" in k):
        mode, level = key.split("/level_")  # "pass1_sampled", "4"
        kind, entry = mode.removeprefix("pass1_"), out.setdefault(level, {})
        entry[f"{kind}_before"], entry[f"{kind}_after"] = before.get(key), after[key]
    return out


def _curve(points: list[dict]) -> list[dict]:
    return [{k: p[k] for k in ("step", "seconds", "tokens", "pass1_sampled", "pass1_greedy")}
            for p in points]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def markdown_table(s: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = ["| held-out pass@1 | SFT start | after SPPO | after control (shuffled rewards) |",
             "|---|---|---|---|",
             f"| sampled (T of the rollouts) | {pct(s['heldout_pass1_sampled_before'])} | "
             f"{pct(s['heldout_pass1_sampled_after'])} | {pct(s['control_pass1_sampled_after'])} |",
             f"| greedy | {pct(s['heldout_pass1_greedy_before'])} | "
             f"{pct(s['heldout_pass1_greedy_after'])} | {pct(s['control_pass1_greedy_after'])} |",
             "",
             *_level_rows(s.get("by_level", {}), pct),
             f"critic on held-out prompts after SPPO: Pearson {num(s['critic_pearson'])}, "
             f"AUC {num(s['critic_auc'])}, Brier {num(s['critic_brier'])}; "
             f"{s['steps']} steps per run, {s['wall_seconds']:.0f} s for both runs"]
    return "\n".join(lines) + "\n"


def _level_rows(by_level: dict, pct) -> list[str]:
    if not by_level:
        return []
    rows = ["| level | sampled before | sampled after | greedy before | greedy after |",
            "|---|---|---|---|---|"]
    for level, v in by_level.items():
        rows.append(f"| {level} | {pct(v.get('sampled_before'))} | {pct(v.get('sampled_after'))}"
                    f" | {pct(v.get('greedy_before'))} | {pct(v.get('greedy_after'))} |")
    return [*rows, ""]


def plot_curve(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, label in ((axes[0], "step", "RL step"),
                         (axes[1], "seconds", "training seconds (2 CPU cores)")):
        for curve, name, style in ((s["curve"], "SPPO", "-o"),
                                   (s["control_curve"], "control (shuffled rewards)", "--s")):
            pts = curve if curve[0]["step"] == 0 else [s["curve"][0], *curve]
            ax.plot([p[x] for p in pts], [p["pass1_sampled"] for p in pts], style,
                    label=f"{name}, sampled")
        ax.plot([p[x] for p in s["curve"]], [p["pass1_greedy"] for p in s["curve"]], ":^",
                label="SPPO, greedy")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out pass@1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="center right")
    fig.suptitle("SPPO on the built-in arithmetic task (tiny model, megatron-core on CPU)")
    save_figure_atomic(fig, path)


def machine_description() -> str:
    """CPU model and core count: float results (and so every figure of a training run)
    depend on the CPU's kernels, so a summary says which machine produced it."""
    import os

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run_demo(output_dir: str | Path, config: str | Path | None = None,
             overrides: tuple[str, ...] = ()) -> Path:
    """Set-up, the SPPO run, the control run, the summary files; returns the directory."""
    from megatron_sppo.config import load_config
    from megatron_sppo.demo.builtin import resolve_builtin

    config = Path(config) if config else REPO_CONFIG
    if not config.is_file():
        raise UserError(f"demo config {config} not found: pass --config "
                        "examples/configs/tiny_cpu_sppo.yaml from a checkout of the repository")
    cfg = load_config(config, list(overrides))  # bad overrides fail here, before any work
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    resolve_builtin(cfg.policy.checkpoint)  # set-up: builds the cached model if needed
    setup = time.time() - t0
    t1 = time.time()
    sppo = train_run(config, out / "sppo", ["trainer.eval_before=true", *overrides])
    total = sppo[-1]["step"]
    control = train_run(config, out / "control", ["reward.shuffle=true", "trainer.eval_before=false",
                                               f"trainer.eval_interval={total}", *overrides])
    summary = summarize(sppo, control)
    summary.update(wall_seconds=time.time() - t1, setup_seconds=setup, config=str(config),
                   overrides=list(overrides), machine=machine_description())
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary)
    write_text_atomic(out / "summary.md", table)
    plot_curve(summary, out / "learning_curve.png")
    print("\n" + table, flush=True)
    print(out, flush=True)
    return out
