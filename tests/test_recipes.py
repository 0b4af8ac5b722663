"""The paper's recipes in examples/configs: each validates at the GPU count its header names,
and the memory per GPU its header quotes is what tools/estimate_memory.py prints today.
tools/prepare_data.py on DAPO-Math-17k-shaped rows: duplicates dropped, held-out problems
kept apart, the output read back by the trainer's loader."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, run

from megatron_sppo.config import load_config
from megatron_sppo.data.prompts import (DAPO_HEAD, DAPO_INSTRUCTION, DAPO_TAIL,
                                        DEFAULT_INSTRUCTION, load_prompt_records)

CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if p.name != "tiny_cpu_sppo.yaml"]


def header(path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def estimate_command(text: str) -> list[str] | None:
    found = re.search(r"\(python (tools/estimate_memory\.py [^)]*)\)", text)
    return shlex.split(found.group(1)) if found else None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_at_its_gpu_count(path):
    cmd = estimate_command(header(path))
    gpus = int(cmd[cmd.index("--gpus") + 1]) if cmd else None
    cfg = load_config(path, world_size=gpus)
    assert cfg.trainer.prompts_per_step > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_quoted_memory_matches_the_estimator(path):
    text = header(path)
    cmd = estimate_command(text)
    if cmd is None:  # a variant that refers to another recipe's figures
        assert re.search(r"Memory: as \S+\.yaml", text), path.name
        return
    proc = run([sys.executable, *cmd], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 0: the layout fits
    printed = {phase: float(v) for phase, v in
               re.findall(r"(training|rollout) phase.*?([\d.]+) GiB", proc.stdout)}
    quoted = {phase: float(v) for phase, v in
              re.findall(r"(training|rollout) phase ([\d.]+) GiB", text)}
    assert quoted == {k: round(v, 1) for k, v in printed.items()}, path.name


def _dapo_row(problem: str, answer: str) -> dict:
    return {"data_source": "math_dapo", "ability": "MATH",
            "prompt": [{"role": "user", "content": f"{DAPO_HEAD}\n\n{problem}\n\n{DAPO_TAIL}"}],
            "reward_model": {"ground_truth": answer, "style": "rule-lang"}}


def test_prepare_data_dedups_and_holds_out(tmp_path):
    rows = [_dapo_row(f"Find $x$ if $x+{i}={i + 2}$.", "2") for i in range(6)]
    rows += [rows[1], rows[4]]  # duplicates, as in the public file
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out, held = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    proc = run([sys.executable, REPO / "tools" / "prepare_data.py", src, "--format", "dapo",
                "--dedup", "--heldout", "2", "--heldout-out", held, "--out", out])
    assert "read 8 records; 2 duplicates dropped; wrote 4" in proc.stdout
    train, val = load_prompt_records([out]), load_prompt_records([held])
    assert len(train) == 4 and len(val) == 2
    assert not {r.prompt for r in train} & {r.prompt for r in val}
    assert all(r.ground_truth == "2" and r.prompt.endswith(DEFAULT_INSTRUCTION) for r in train)
    assert json.loads(out.read_text().splitlines()[0]).keys() == {"prompt", "answer",
                                                                  "data_source"}
    bad = run([sys.executable, REPO / "tools" / "prepare_data.py", src, "--heldout", "1",
               "--out", tmp_path / "x.jsonl"], check=False)
    assert bad.returncode == 2 and "--heldout-out" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


# ---- the recipes against the SPPO authors' scripts -------------------------------------------
# (recipe key, value, where in github.com/1BIMU/SPPO at e1b4f27 the value comes from). Script
# lines are those of run_scripts/<script>; verl's defaults (config files of their fork) hold
# for what the scripts leave out. The README's table repeats these with every difference.
SEVEN_B = "run_R1-7B_DAPO_SEQUENCE.sh"
SMALL_CRITIC = "run_R1-7B_DAPO_SEQUENCE_small_critic.sh"
ONE_FIVE_B = "run_ds1.5B_PPO_SEQUENCE_shuffle.sh"
VERL = "verl/trainer/config/"
VERL_DEFAULTS = [
    ("critic.weight_decay", 0.01, VERL + "critic/critic.yaml:28 optim.weight_decay: 0.01"),
    ("algorithm.eps_low", 0.2, VERL + "actor/actor.yaml:36 clip_ratio_low: 0.2"),
    ("algorithm.eps_high", 0.2, VERL + "actor/actor.yaml:39 clip_ratio_high: 0.2"),
    ("algorithm.dual_clip", 3.0, VERL + "actor/actor.yaml:69 clip_ratio_c: 3.0"),
    ("algorithm.entropy_coef", 0.0, VERL + "actor/actor.yaml:75 entropy_coeff: 0"),
    ("trainer.ppo_epochs", 1, VERL + "actor/actor.yaml:91 ppo_epochs: 1"),
    ("policy.clip_grad", 1.0, VERL + "actor/dp_actor.yaml:29 grad_clip: 1.0"),
    ("rollout.n", 1, VERL + "rollout/rollout.yaml n: 1"),
    ("rollout.top_p", 1.0, VERL + "rollout/rollout.yaml:17 top_p: 1, :133 val_kwargs.top_p"),
    ("trainer.eval_samples", 1, VERL + "rollout/rollout.yaml:139 val_kwargs.n: 1"),
    ("algorithm.truncated_reward", None,
     "verl/utils/reward_score/naive_dapo.py:499 (truncation check removed)"),
]
CRITIC_DEFAULTS = [
    ("critic.clip_grad", 1.0, VERL + "critic/dp_critic.yaml:65 grad_clip: 1.0"),
]


def _sppo_script(script: str, critic: str, critic_lr: float, big: bool) -> list[tuple]:
    """What an SPPO run script sets, with its line numbers (the three scripts share them)."""
    at = lambda line, text: f"{script}:{line} {text}"  # noqa: E731
    return [
        ("data.train_files", ["dapo-math-17k_dedup.parquet" if big else "deepscaler-math.parquet"],
         at(5, "train_path=data/...")),
        ("algorithm.estimator", "sppo", at(13, "algorithm.adv_estimator=sequence_level_adv")),
        ("algorithm.kl_in_reward", 0.0, at(14, "algorithm.use_kl_in_reward=False")),
        ("trainer.prompts_per_step", 512 if big else 256, at(17, "data.train_batch_size")),
        ("data.shuffle", True, at(18, "data.shuffle=True")),
        ("rollout.max_prompt_length", 2048 if big else 1024, at(20, "data.max_prompt_length")),
        ("rollout.max_response_length", 8192, at(21, "data.max_response_length=8192")),
        ("data.overlong_prompts", "truncate_left" if big else "drop",
         at("22-23", "data.filter_overlong_prompts, data.truncation")),
        ("policy.checkpoint", "DeepSeek-R1-Distill-Qwen-7B" if big else
         "DeepSeek-R1-Distill-Qwen-1.5B", at(24, "actor_rollout_ref.model.path")),
        ("policy.lr", 1e-6, at(27, "actor.optim.lr=1e-6")),
        ("policy.lr_decay_style", "constant", at(29, "actor.optim.warmup_style=constant")),
        ("policy.weight_decay", 0.1 if big else 0.01, at(30, "actor.optim.weight_decay")),
        ("policy.lr_warmup_steps", 0, at(31, "actor.optim.lr_warmup_steps_ratio=0")),
        ("algorithm.kl_coef", 0.0, at(35, "actor.use_kl_loss=False")),
        ("trainer.mini_batch_size", 32 if big else 128, at(37, "actor.ppo_mini_batch_size")),
        ("algorithm.loss_agg_mode", "seq-mean-token-mean",
         at(38, f"ppo_micro_batch_size_per_gpu={1 if big else 2}, each micro-batch's token "
                "mean (actor.yaml:72 loss_agg_mode: token-mean) averaged")),
        ("rollout.temperature", 0.6, at("42, 44", "rollout and val_kwargs temperature=0.6")),
        ("critic.checkpoint", critic, at(52, "critic.model.path")),
        ("critic.lr", critic_lr, at(53, "critic.optim.lr")),
        ("critic.warmup_steps", 0, at(61, "trainer.critic_warmup=0")),
        ("trainer.eval_interval", 2 if big else 10, at(69, "trainer.test_freq")),
        ("trainer.eval_before", True, at(70, "trainer.val_before_train=True")),
        ("trainer.total_steps", 200 if big else 2000, at(71, "trainer.total_training_steps")),
        ("trainer.save_interval", 10 if big else 2, at(68, "trainer.save_freq")),
    ] + VERL_DEFAULTS + CRITIC_DEFAULTS


EVAL_FILES = ["math__aime_repeated_8x_240.parquet", "math__aime2025_2025.parquet",
              "math__amc23_2025.parquet", "math__math_500.parquet",
              "math__minerva_math_2025_processed.parquet"]
ONE_FIVE_B_RECIPES = ("sppo_r1_distill_qwen_1.5b", "grpo_r1_distill_qwen_1.5b",
                      "ppo_gae_r1_distill_qwen_1.5b")
# Where a recipe deliberately differs from the script: (recipe, key) -> its value. The
# README's table gives each one with its reason.
DIFFERENCES = {(name, "trainer.save_interval"): 20 for name in ONE_FIVE_B_RECIPES}


def _baseline(overrides: list[tuple], critic: bool) -> list[tuple]:
    """A paper baseline at 1.5B: the SPPO script's data, lengths and batch sizes."""
    keys = {k for k, _, _ in overrides}
    base = [e for e in _sppo_script(ONE_FIVE_B, None, 5e-6, big=False) if e[0] not in keys
            and (critic or not e[0].startswith("critic."))]
    return base + overrides


RECIPE_SCRIPTS = {
    "sppo_r1_distill_qwen_7b": _sppo_script(SEVEN_B, None, 1e-5, big=True),
    "sppo_r1_distill_qwen_7b_critic_1.5b": _sppo_script(
        SMALL_CRITIC, "DeepSeek-R1-Distill-Qwen-1.5B", 1e-5, big=True),
    "sppo_r1_distill_qwen_7b_fp8": _sppo_script(
        SMALL_CRITIC, "DeepSeek-R1-Distill-Qwen-1.5B", 1e-5, big=True),
    "sppo_r1_distill_qwen_1.5b": _sppo_script(ONE_FIVE_B, None, 5e-6, big=False),
    "grpo_r1_distill_qwen_1.5b": _baseline([
        ("algorithm.estimator", "grpo", "paper: GRPO, N = 8"),
        ("rollout.n", 8, "paper: N = 8"),
        ("trainer.prompts_per_step", 32, f"{ONE_FIVE_B}:17 256 responses a step, 32 x 8"),
        ("trainer.mini_batch_size", 16, f"{ONE_FIVE_B}:37 128 responses a mini-batch, 16 x 8"),
    ], critic=False),
    "ppo_gae_r1_distill_qwen_1.5b": _baseline([
        ("algorithm.estimator", "gae", "paper: token-level PPO with GAE"),
        ("algorithm.gamma", 1.0, "paper: gamma = 1; " + VERL + "ppo_trainer.yaml:69"),
        ("algorithm.lam", 1.0, "paper: lambda = 1; " + VERL + "ppo_trainer.yaml:72"),
        ("algorithm.value_clip", 0.5, VERL + "critic/critic.yaml:77 cliprange_value: 0.5"),
        ("critic.warmup_steps", 50, "paper: critic warm-up 50 steps"),
    ], critic=True),
}


def _value(cfg, key: str):
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if key in ("policy.checkpoint", "critic.checkpoint"):
        return None if value is None else value.rstrip("/").rsplit("/", 1)[-1]
    if key == "data.train_files":
        return [v.rsplit("/", 1)[-1] for v in value]
    return value


def test_every_paper_recipe_is_checked_against_an_authors_script():
    assert sorted(RECIPE_SCRIPTS) == sorted(p.stem for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_matches_the_authors_script(path):
    cfg = load_config(path)
    for key, value, source in RECIPE_SCRIPTS[path.stem]:
        want = DIFFERENCES.get((path.stem, key), value)
        assert _value(cfg, key) == want, f"{path.name}: {key} (authors: {source})"
    assert [f.rsplit("/", 1)[-1] for f in cfg.data.eval_files] == EVAL_FILES
    assert cfg.data.instruction == DAPO_INSTRUCTION
    text = header(path)
    assert "authors" in text and cfg.algorithm.loss_agg_mode in text, path.name


def test_readme_table_names_every_recipe_difference():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| setting | paper | authors' script |"):]
    table = table[:table.index("\n\n")]
    for (recipe, key), value in DIFFERENCES.items():
        (row,) = [line for line in table.splitlines() if f"`{key}" in line]
        assert str(value) in row.split("|")[4], (recipe, key)  # the recipe column
    for key in {k for entries in RECIPE_SCRIPTS.values() for k, _, _ in entries}:
        assert re.search(rf"`{re.escape(key)}[`:]", table), key
