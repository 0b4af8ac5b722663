"""Every command in README.md's bash blocks is run by a test or marked as not runnable here,
so documentation and behaviour cannot drift apart: a command that is neither (a new one, or
an edited one) fails :func:`test_every_readme_command_is_run_or_marked`.

The commands run from a scratch directory (``examples/`` linked in) exactly as written, with
``megatron-sppo`` as ``python -m megatron_sppo`` (or the CLI's ``main`` in-process) and
``torchrun`` as ``python -m torch.distributed.run`` on a free port. The two training commands
get cheap overrides appended (``CHEAP``: 2 steps, or 1 under torchrun, of 8 prompts, a tiny
held-out set) and use the small built-in model of the ``small_builtin`` fixture; the
conversion commands convert a 3-layer Qwen2 stand-in placed at the README's model path.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from helpers import REPO, assert_bit_identical, load_hf_tensors, readme_command, readme_commands
from helpers import run

from megatron_sppo.cli import main as cli_main
from megatron_sppo.models.tiny import make_tiny_hf_model

TRAIN = ("megatron-sppo train --config examples/configs/tiny_cpu_sppo.yaml "
         "trainer.output_dir=outputs/t trainer.total_steps=20 trainer.save_interval=10")
TORCHRUN = ("torchrun --nproc-per-node 4 -m megatron_sppo.train --config "
            "examples/configs/tiny_cpu_sppo.yaml policy.tensor_model_parallel_size=2 "
            "policy.pipeline_model_parallel_size=2 critic.tensor_model_parallel_size=1 "
            "critic.pipeline_model_parallel_size=2 --resume auto")
CONVERT = ("megatron-sppo convert hf-to-megatron --hf-path DeepSeek-R1-Distill-Qwen-7B "
           "--megatron-path ckpt/r1-7b --tp 2 --pp 2")
VERIFY = ("megatron-sppo convert verify --megatron-path ckpt/r1-7b "
          "--hf-path DeepSeek-R1-Distill-Qwen-7B")
EXPORT = "megatron-sppo convert megatron-to-hf --megatron-path ckpt/r1-7b --hf-path export/r1-7b"
RUN_HERE = (TRAIN, TORCHRUN, CONVERT, VERIFY, EXPORT)

# run by another test, which takes the command from the README by this marker
RUN_ELSEWHERE = {
    "pretrain_gpt.py": "test_megatron_lm_interop.py",
    "--megatron-path ckpt/r1-7b-continued": "test_megatron_lm_interop.py",
    "benchmark_vs_trl.py": "test_benchmark_vs_trl.py",
}

NOT_RUN = {
    "bash tools/setup_cpu.sh && .venv/bin/megatron-sppo demo --output-dir outputs/demo":
        "set-up command (1): CI runs it (.ci/run); test_demo.py runs the demo at small size",
    "bash tools/run_tests.sh": "set-up command (2): the whole suite, which CI runs",
    ".venv/bin/python -m pytest tests/test_preemption.py":
        "one file of the suite (set-up command 2), which CI runs",
    "megatron-sppo train --config FILE.yaml [--resume auto|DIR] [key=value ...]":
        "synopsis with placeholders; its concrete forms (TRAIN, TORCHRUN) are run",
    "torchrun --nproc-per-node 8 -m megatron_sppo.train --config FILE.yaml ...":
        "synopsis for an 8-GPU node",
    "megatron-sppo eval --model ckpt/or/hf_dir --output-dir outputs/eval "
    "--benchmark aime24=data/aime24.parquet --benchmark aime25=data/aime25.jsonl "
    "--benchmark amc23=data/amc23.parquet --benchmark math500=data/math500.jsonl "
    "--benchmark minerva_math=data/minerva.jsonl [--engine sglang --address http://host:30000]":
        "placeholders and the five benchmark files from the hub (not reachable here); "
        "test_evaluation.py runs `megatron-sppo eval` on files in those layouts",
}

CHEAP = ["trainer.prompts_per_step=8", "trainer.mini_batch_size=2", "critic.mini_batch_size=8",
         "data.eval_size=4", "trainer.eval_samples=1", "rollout.max_response_length=12",
         "trainer.progress=false"]


def test_every_readme_command_is_run_or_marked():
    commands = readme_commands()
    elsewhere = {readme_command(marker) for marker in RUN_ELSEWHERE}
    known = {*RUN_HERE, *elsewhere, *NOT_RUN}
    for command in commands:
        assert command in known, f"README command neither run by a test nor marked: {command}"
    for command in {*RUN_HERE, *NOT_RUN}:
        assert command in commands, f"no longer in the README: {command}"
    for marker, test_file in RUN_ELSEWHERE.items():
        assert f"readme_command({marker!r})".replace("'", '"') in (
            REPO / "tests" / test_file).read_text(), (marker, test_file)


def _scratch(tmp_path: Path) -> Path:
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_training_command(small_builtin, tmp_path):
    cache, _ = small_builtin
    words = shlex.split(TRAIN)
    run([sys.executable, "-m", "megatron_sppo", *words[1:], "trainer.total_steps=2",
         "trainer.save_interval=2", *CHEAP], cwd=_scratch(tmp_path),
        env={"MEGATRON_SPPO_CACHE": str(cache)})
    out = tmp_path / "outputs" / "t"
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert (out / "checkpoints" / "latest").is_file()


def test_the_torchrun_command_with_uneven_pipeline_stages(small_builtin, tmp_path):
    """The built-in model has 3 layers: policy and critic at PP=2 take the default split."""
    from megatron_sppo.runtime.distributed import free_port

    cache, _ = small_builtin
    words = shlex.split(TORCHRUN)
    assert words[0] == "torchrun"
    run([sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}",
         *words[1:], "trainer.total_steps=1", *CHEAP], cwd=_scratch(tmp_path),
        env={"MEGATRON_SPPO_CACHE": str(cache)})
    out = tmp_path / "outputs" / "tiny_cpu_sppo"
    (record,) = _metrics(out)
    assert record["step"] == 1 and record["policy_skipped"] == 0 == record["critic_skipped"]


def test_the_conversion_commands(tmp_path, monkeypatch, capsys):
    """The stand-in has 3 layers, so --pp 2 writes the default 2 + 1 split."""
    hf = make_tiny_hf_model(tmp_path / "DeepSeek-R1-Distill-Qwen-7B", "qwen2", num_layers=3)
    monkeypatch.chdir(tmp_path)
    for command in (CONVERT, VERIFY, EXPORT):
        words = shlex.split(command)
        assert words[0] == "megatron-sppo" and cli_main(words[1:]) == 0, command
    printed = capsys.readouterr().out
    assert "--use-checkpoint-args --norm-epsilon 1e-06" in printed
    meta = json.loads((tmp_path / "ckpt/r1-7b/iter_0000000/megatron_sppo.json").read_text())
    assert (meta["saved_tp"], meta["saved_pp"]) == (2, 2)
    run_config = (tmp_path / "ckpt/r1-7b/iter_0000000/run_config.yaml").read_text()
    assert "num_layers_in_first_pipeline_stage: 2" in run_config
    assert_bit_identical(load_hf_tensors(hf), load_hf_tensors(tmp_path / "export/r1-7b"))
