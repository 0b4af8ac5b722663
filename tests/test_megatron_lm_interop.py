"""Megatron-LM's own training code trains this project's converted checkpoints, and what it
saves converts back: the README's ``pretrain_gpt.py`` command line, parsed by
``megatron.training.arguments`` (``--use-checkpoint-args`` reads the model arguments from the
checkpoint), ``load_checkpoint`` into the GPTModel Megatron-LM builds from them at TP=1 and
at TP=2 x PP=2 (uneven stages: 3 layers as 2 + 1) with HF transformers' logits, two
``train_step``s and ``save_checkpoint`` with optimizer state; the README's
``megatron-to-hf`` command turns that into HF weights bit-identical to the trained ones, and
``megatron-sppo train`` builds a policy and a critic from it.

Runs on CPU (gloo, the CPU device layer; tests/dist/megatron_lm_interop.py says which parts
of ``pretrain()`` are done by hand there). The README command runs at the tests' scale: its
flags verbatim (relative paths, run from a directory holding ``ckpt/r1-7b``) except the
layout and sizes below, fp32 instead of ``--bf16``, plus the CPU flags the README names.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import transformers
from helpers import README, assert_bit_identical, load_hf_tensors, readme_command, torchrun
from safetensors.torch import load_file

from megatron_sppo.cli import main as cli_main
from megatron_sppo.models.tiny import make_tiny_hf_model

CPU_FLAGS = ["--transformer-impl", "local", "--no-persist-layer-norm", "--no-rope-fusion",
             "--no-gradient-accumulation-fusion", "--distributed-backend", "gloo"]
SCALE = {"--seq-length": "16", "--micro-batch-size": "2", "--global-batch-size": "4",
         "--train-iters": "2"}
LAYOUTS = {"tp1": dict(nproc=1, tp=1, pp=1), "tp2pp2": dict(nproc=4, tp=2, pp=2, first=2)}
STEPS = 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 3-layer Qwen2 stand-in for the README's model, converted to ckpt/r1-7b."""
    root = tmp_path_factory.mktemp("megatron_lm")
    hf = make_tiny_hf_model(root / "DeepSeek-R1-Distill-Qwen-7B", "qwen2", num_layers=3)
    assert cli_main(["convert", "hf-to-megatron", "--hf-path", str(hf), "--megatron-path",
                     str(root / "ckpt" / "r1-7b"), "--no-progress"]) == 0
    return root, hf


def megatron_lm_command(tp: int, pp: int, first: int | None) -> tuple[dict, list[str]]:
    """(environment, flags) of the README's pretrain_gpt.py command at the tests' scale."""
    words = shlex.split(readme_command("pretrain_gpt.py"))
    env = dict(w.split("=", 1) for w in words[:words.index("torchrun")])
    flags = words[words.index("pretrain_gpt.py") + 1:]
    flags.remove("--bf16")  # the stand-in is fp32, compared with HF in fp32
    values = {**SCALE, "--tensor-model-parallel-size": str(tp),
              "--pipeline-model-parallel-size": str(pp)}
    for flag, value in values.items():
        flags[flags.index(flag) + 1] = value
    if first is not None:
        flags += ["--decoder-first-pipeline-num-layers", str(first)]
    return env, flags + CPU_FLAGS


@pytest.fixture(scope="module", params=list(LAYOUTS))
def megatron_lm_run(request, converted, tmp_path_factory):
    """Megatron-LM loads ckpt/r1-7b at this layout, trains two steps and saves
    ckpt/r1-7b-continued (tests/dist/megatron_lm_interop.py)."""
    root, hf = converted
    layout = LAYOUTS[request.param]
    work = tmp_path_factory.mktemp(request.param)
    (work / "ckpt").mkdir()
    (work / "ckpt" / "r1-7b").symlink_to(root / "ckpt" / "r1-7b")
    env, flags = megatron_lm_command(layout["tp"], layout["pp"], layout.get("first"))
    results = torchrun("megatron_lm_interop.py", layout["nproc"], "--out", work,
                       "--steps", str(STEPS), "--", *flags, env=env, cwd=work)
    return work, hf, results


def test_the_readme_names_the_cpu_flags():
    assert " ".join(CPU_FLAGS) in " ".join(README.read_text().split())


def test_megatron_lm_builds_the_model_from_the_checkpoint_and_loads_it(megatron_lm_run):
    work, hf, results = megatron_lm_run
    summary = next(r for r in results if "saved_iteration" in r)
    # the README's flags name no architecture: --use-checkpoint-args read it from the checkpoint
    assert summary["num_layers"] == 3 and summary["padded_vocab_size"] == 320
    ids = torch.load(work / "ids.pt")
    loaded = torch.load(work / "logits_loaded.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(ids).logits
    vocab = reference.shape[-1]
    assert (loaded[..., :vocab] - reference).abs().max().item() <= 1e-4
    assert bool((loaded[..., vocab:] == 0).all())  # padded rows: no token, zero logits
    losses = [r for r in results if "lm_loss" in r]
    assert [r["iteration"] for r in losses] == [1, 2] and not any(r["skipped"] for r in losses)


def test_what_megatron_lm_saved_converts_to_hf_bit_identically(megatron_lm_run, monkeypatch):
    from megatron.core import dist_checkpointing

    work, hf, results = megatron_lm_run
    saved = work / "ckpt" / "r1-7b-continued"
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    iter_dir = saved / f"iter_{STEPS:07d}"
    assert not (iter_dir / "megatron_sppo.json").exists()  # Megatron-LM's checkpoint alone
    keys = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    assert any(k.startswith("optimizer.") for k in keys), "no optimizer state saved"
    monkeypatch.chdir(work)  # the README command's relative paths
    command = shlex.split(readme_command("--megatron-path ckpt/r1-7b-continued"))
    assert command[:2] == ["megatron-sppo", "convert"]
    assert cli_main([*command[1:], "--no-progress"]) == 0
    exported = work / "export" / "r1-7b-continued"
    assert_bit_identical(load_file(str(work / "trained.safetensors")), load_hf_tensors(exported))
    ids, trained = torch.load(work / "ids.pt"), torch.load(work / "logits_trained.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(ids).logits
    assert (trained[..., :logits.shape[-1]] - logits).abs().max().item() <= 1e-4
    assert not torch.equal(trained, torch.load(work / "logits_loaded.pt")), "training no-op"
    config = json.loads((exported / "config.json").read_text())
    assert config == json.loads((hf / "config.json").read_text())


def test_megatron_sppo_trains_from_what_megatron_lm_saved(megatron_lm_run, megatron_tp1):
    """The saved checkpoint as policy.checkpoint (its logits) and critic.checkpoint, found
    through the relative tokenizer path Megatron-LM recorded (from a directory above it)."""
    from megatron_sppo.config import CriticConfig, ModelConfig
    from megatron_sppo.models.inputs import causal_inputs
    from megatron_sppo.trainer.models import build_trained_model

    work, _, _ = megatron_lm_run
    saved = str(work / "ckpt" / "r1-7b-continued")
    ids, trained = torch.load(work / "ids.pt"), torch.load(work / "logits_trained.pt")
    policy = build_trained_model("policy", ModelConfig(checkpoint=saved), saved, total_steps=1)
    with torch.no_grad():
        logits = policy.module(ids, *causal_inputs(ids))
    vocab = policy.arch.vocab_size
    assert (logits[..., :vocab] - trained[..., :vocab]).abs().max() <= 1e-4
    critic = build_trained_model("critic", CriticConfig(checkpoint=saved), saved, total_steps=1)
    with torch.no_grad():
        values = critic.module(ids, *causal_inputs(ids))
    assert values.shape == (*ids.shape, 1) and bool(torch.isfinite(values).all())
    assert torch.equal(critic.module.embedding.word_embeddings.weight,
                       policy.module.embedding.word_embeddings.weight)
