"""tools/benchmark_vs_trl.py, the README's command with --quick: TRL's GRPOTrainer (in its own
environment, .venv-trl, created on first use), megatron_sppo GRPO and SPPO run 2 steps each
from the same warm start and are scored by the same evaluator (identical step-0 figures); the
report has the table, the targets, both sides' settings and what differs between them."""

from __future__ import annotations

import json
import shlex
import sys

from helpers import REPO, readme_command, run


def test_quick_benchmark(small_builtin, tmp_path):
    cache, _ = small_builtin
    words = shlex.split(readme_command("benchmark_vs_trl.py"))
    assert words[:2] == ["python", "tools/benchmark_vs_trl.py"]
    out = tmp_path / "vs_trl"
    args = [a if a != "outputs/vs_trl" else str(out) for a in words[2:]]
    proc = run([sys.executable, REPO / "tools" / "benchmark_vs_trl.py", *args, "--quick"],
               env={"MEGATRON_SPPO_CACHE": str(cache)}, timeout=1800)
    report = (out / "benchmark.md").read_text()
    assert report in proc.stdout
    for label in ("TRL GRPOTrainer", "megatron_sppo GRPO", "megatron_sppo SPPO"):
        assert f"| {label} |" in report
    assert "megatron_sppo GRPO median step / TRL GRPO's" in report
    differ = next(line for line in report.splitlines() if line.startswith("Settings that differ"))
    assert "generation" in differ and "learning rate" not in differ
    assert "prompt order" not in differ and "precision" not in differ
    runs = json.loads((out / "benchmark.json").read_text())["runs"]
    start = {system: per_seed["1"]["points"][0] for system, per_seed in runs.items()}
    for system, per_seed in runs.items():
        steps = per_seed["1"]["steps"]
        assert [s["step"] for s in steps] == [1, 2], system
        assert all(s["seconds"] > 0 and s["tokens"] > 0 for s in steps), system
        assert [p["step"] for p in per_seed["1"]["points"]] == [0, 2], system
    # one evaluator, one warm start, the same seeds: the same step-0 figures on every side
    assert start["trl_grpo"]["pass1_sampled"] == start["grpo"]["pass1_sampled"]
    assert start["grpo"]["pass1_greedy"] == start["sppo"]["pass1_greedy"]
    # TRL trained on megatron_sppo's GRPO prompts, in the same order
    assert (out / "trl_grpo_seed1" / "prompts.jsonl").is_file()
    assert (out / "benchmark.png").stat().st_size > 0
