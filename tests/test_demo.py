"""The CPU demo's pieces at small size: the cached built-in model (HF model -> conversion ->
SFT, under a lock, renamed into place when complete) and `megatron-sppo demo` end to end on
the real demo config with a short budget: both runs, the summary files, the path last."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import run

from megatron_sppo.data.arithmetic import make_prompt_records
from megatron_sppo.demo import builtin

SUMMARY_KEYS = ("heldout_pass1_greedy_before", "heldout_pass1_greedy_after",
                "heldout_pass1_sampled_before", "heldout_pass1_sampled_after",
                "control_pass1_sampled_after", "critic_pearson", "critic_auc", "critic_brier")


def test_builtin_model_is_built_once_and_complete(small_builtin, monkeypatch):
    cache, path = small_builtin
    assert path == cache / f"{builtin.NAME}-{builtin.VERSION}" / "sft"
    assert (path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not list(cache.glob("*.partial"))
    monkeypatch.setenv("MEGATRON_SPPO_CACHE", str(cache))
    monkeypatch.setattr(builtin, "_build", lambda *a: pytest.fail("rebuilt a cached model"))
    assert builtin.resolve_builtin(f"builtin:{builtin.NAME}") == str(path)
    with pytest.raises(Exception, match="the only one is builtin:tiny-arithmetic"):
        builtin.resolve_builtin("builtin:nope")


def test_demo_command_at_small_size(small_builtin, tmp_path):
    cache, _ = small_builtin
    out = tmp_path / "demo"
    proc = run([sys.executable, "-m", "megatron_sppo", "demo", "--output-dir", out,
                "trainer.total_steps=2", "trainer.eval_interval=2", "trainer.save_interval=0",
                "trainer.prompts_per_step=8", "trainer.mini_batch_size=2",
                "critic.mini_batch_size=8", "data.eval_size=6", "trainer.eval_samples=2",
                "rollout.max_response_length=12", "trainer.progress=false"],
               env={"MEGATRON_SPPO_CACHE": str(cache)})
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS[:5]:
        assert 0 <= summary[key] <= 1, key
    # a 3-step SFT model solves nothing: the critic figures may be undefined (null)
    assert summary["critic_brier"] is None or 0 <= summary["critic_brier"] <= 1
    assert all(key in summary for key in SUMMARY_KEYS)
    assert summary["wall_seconds"] > 0 and summary["steps"] == 2
    assert [p["step"] for p in summary["curve"]] == [0, 2]
    sppo = [json.loads(x) for x in (out / "sppo" / "metrics.jsonl").read_text().splitlines()]
    assert summary["heldout_pass1_sampled_before"] == sppo[0]["eval/pass1_sampled"]
    control_cfg = (out / "control" / "config.yaml").read_text()
    assert "shuffle: true" in control_cfg
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.md").read_text()
    assert "| sampled" in table and "| level |" in table
    # the held-out problems of every difficulty level, before and after
    levels = {str(r["level"]) for r in make_prompt_records(6, split="heldout", seed=0)}
    assert set(summary["by_level"]) == levels
    for level, v in summary["by_level"].items():
        assert v["greedy_after"] == sppo[-1][f"eval/pass1_greedy/level_{level}"]
        assert 0 <= v["sampled_before"] <= 1
    assert summary["machine"].endswith(" cores")
