"""tools/gpu_check.py on the emulated accelerator with the SGLang stand-in: every check that
needs no Transformer Engine runs (the colocated SGLang run with its log-prob mismatch and
memory hand-over, the weight-sync timing) and the TE/FP8 ones are skipped with their reason,
so the script a user runs first on a GPU node cannot go stale."""

from __future__ import annotations

import json
import os
import sys

from helpers import DIST, REPO, run


def test_gpu_check_runs_on_the_emulated_accelerator(tmp_path):
    env = {"MEGATRON_SPPO_EMULATE_GPU": "1", "MEGATRON_SPPO_EMULATE_GPU_MEMORY": str(256 << 20),
           "MEGATRON_SPPO_EMULATE_GPU_DIR": str(tmp_path / "gpus"),
           "PYTHONPATH": os.pathsep.join([str(DIST / "fake_sglang"), str(REPO)])}
    proc = run([sys.executable, REPO / "tools" / "gpu_check.py", "--output-dir", tmp_path,
                "--sglang-python", sys.executable, "--sync-model", "tiny",
                "--check-model", "tiny"], env=env, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["emulated"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"environment", "te_vs_local", "fp8_delayed", "fp8_tensorwise",
                           "fp8_blockwise", "fp8_mxfp8", "sglang_colocated", "weight_sync"}
    for name in ("te_vs_local", "fp8_delayed", "fp8_mxfp8"):
        assert checks[name]["status"] == "skipped"
        assert "Transformer Engine" in checks[name]["reason"]
    env_check = checks["environment"]
    assert env_check["status"] == "passed", env_check
    assert env_check["figures"]["stacks"]["sglang"]["torch"]  # both stacks reported
    colocated = checks["sglang_colocated"]
    assert colocated["status"] == "passed", colocated
    f = colocated["figures"]
    assert f["steps"] == 2 and f["logprob_mismatch_mean"] <= 0.05
    # Megatron's grad buffers and optimizer states left the GPU while SGLang generated
    assert f["rollout_allocated_gb"] < f["train_allocated_gb"]
    sync = checks["weight_sync"]
    assert sync["status"] == "passed" and sync["figures"]["sync_s"] > 0, sync
    assert "| sglang_colocated | passed |" in (tmp_path / "gpu_check.md").read_text()
    assert proc.returncode == 0
