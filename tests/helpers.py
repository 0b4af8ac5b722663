"""Shared test helpers: tiny HF model zoo, torchrun launcher, tensor comparison."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"
README = REPO / "README.md"

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name -> make_tiny_hf_model keywords: every family with GQA and MHA, tied and untied, plus
# Qwen3 with head_dim != hidden/heads and Llama 3.1-style rope scaling.
ZOO = {
    f"{family}_{attn}_{tie}": dict(family=family, num_kv_heads=2 if attn == "gqa" else 4,
                                   tie_word_embeddings=tie == "tied")
    for family in ("llama", "qwen2", "qwen3", "mistral")
    for attn in ("gqa", "mha")
    for tie in ("untied", "tied")
}
ZOO["qwen3_headdim32"] = dict(family="qwen3", head_dim=32)
ZOO["llama_rope_llama3"] = dict(family="llama", rope_scaling=LLAMA3_ROPE,
                                max_position_embeddings=16384, rope_theta=500000.0)


def run(cmd: list[str], timeout: int = 600, check: bool = True,
        env: dict | None = None, cwd: Path = REPO,
        input: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(script: str, nproc: int, *args, timeout: int = 600, env: dict | None = None,
             cwd: Path = REPO) -> list[dict]:
    """Run tests/dist/<script> (or a module with -m) on ``nproc`` gloo ranks; parse RESULTs."""
    from megatron_sppo.runtime.distributed import free_port

    target = ["-m", script[3:]] if script.startswith("-m ") else [DIST / script]
    proc = run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                f"--master-port={free_port()}", *target, *args], timeout=timeout, env=env,
               cwd=cwd)
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]


def load_hf_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


def readme_commands(path: Path = README) -> list[str]:
    """Every command in the README's ```bash blocks, one string each: continuation lines
    joined, comment lines and trailing comments dropped, whitespace collapsed."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
            if not line and not pending:
                continue
            pending += " " + line.rstrip("\\")
            if not line.endswith("\\"):
                commands.append(" ".join(pending.split()))
                pending = ""
    return commands


def readme_command(marker: str) -> str:
    """The one README command that contains ``marker``."""
    found = [c for c in readme_commands() if marker in c]
    assert len(found) == 1, f"{len(found)} README commands contain {marker!r}: {found}"
    return found[0]


def sglang_kv_tokens(model, budget: int, tp: int, mem_fraction_static: float) -> int:
    """SGLang 0.5.23's KV pool size for ``model`` (a transformers model, fp32) served at TP
    ``tp`` on a GPU of ``budget`` bytes with nothing else on it: (free after loading - free
    before x (1 - mem_fraction_static)) // cell, cell = kv heads per rank x 2 x head_dim x
    layers x 4 bytes (mem_cache/kv_cache_configurator.py, model_executor/pool_configurator.py);
    each stand-in rank holds the model's parameters and buffers."""
    config, gib = model.config, 1 << 30
    loaded = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    head_dim = config.hidden_size // config.num_attention_heads
    cell = max(1, config.num_key_value_heads // tp) * 2 * head_dim * config.num_hidden_layers * 4
    rest = (budget - loaded) / gib - budget / gib * (1 - mem_fraction_static)
    return int(rest * gib) // cell
