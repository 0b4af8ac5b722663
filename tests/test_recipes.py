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
from megatron_sppo.data.prompts import (DAPO_HEAD, DAPO_TAIL, DEFAULT_INSTRUCTION,
                                        load_prompt_records)

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
