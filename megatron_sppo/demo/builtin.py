"""``builtin:tiny-arithmetic``: the tiny warm-started policy the demo and its config start
from, built once into a cache directory and reused by every later run and test.

Build: a random Qwen2-shaped HF model with the character tokenizer -> Megatron checkpoint
(``megatron-sppo convert``) -> supervised warm start (``megatron-sppo sft``) on partly
wrong demonstrations of the arithmetic task, so the start has headroom for RL. One process
builds it under a file lock (other ranks and concurrent runs wait), into a temporary
directory renamed into place when complete.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from megatron_sppo.errors import UserError

BUILTIN_PREFIX = "builtin:"
NAME = "tiny-arithmetic"
VERSION = "v2"

# The recipe, from plain-PyTorch prototypes of the same task (measured on 2 cores: held-out
# pass@1 at T=1 ~0.45 after SFT, greedy ~0.8; see README "The CPU demo"). Half of the
# demonstrations carry one copy slip, so sampling errs often while the argmax stays right.
MODEL = dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=512,
             max_position_embeddings=256, seed=0)
SFT = dict(records=32000, corrupt=0.5, steps=500, batch_size=64, lr=3e-3, min_lr=3e-4,
           warmup_steps=30, adam_beta2=0.98, seed=0)


def cache_root() -> Path:
    return Path(os.environ.get("MEGATRON_SPPO_CACHE",
                               Path.home() / ".cache" / "megatron_sppo"))


def builtin_dir() -> Path:
    return cache_root() / f"{NAME}-{VERSION}"


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clean_env() -> dict:
    """The environment for a single-process child: no torchrun/Slurm rank variables."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID",
            "SLURM_NTASKS", "SLURM_LOCALID")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _build(tmp: Path, progress: bool) -> None:
    from megatron_sppo.data.arithmetic import make_sft_records, write_jsonl
    from megatron_sppo.models.tiny import make_tiny_hf_model

    make_tiny_hf_model(tmp / "hf", "qwen2", **MODEL)
    write_jsonl(make_sft_records(SFT["records"], seed=SFT["seed"], corrupt=SFT["corrupt"]),
                tmp / "sft.jsonl")
    cli = [sys.executable, "-m", "megatron_sppo"]
    quiet = [] if progress else ["--no-progress"]
    steps = [
        [*cli, "convert", "hf-to-megatron", "--hf-path", str(tmp / "hf"),
         "--megatron-path", str(tmp / "base"), *quiet],
        [*cli, "sft", "--model", str(tmp / "base"), "--data", str(tmp / "sft.jsonl"),
         "--output", str(tmp / "sft"), "--steps", str(SFT["steps"]),
         "--batch-size", str(SFT["batch_size"]), "--lr", str(SFT["lr"]),
         "--min-lr", str(SFT["min_lr"]), "--warmup-steps", str(SFT["warmup_steps"]),
         "--adam-beta2", str(SFT["adam_beta2"]),
         "--seed", str(SFT["seed"]), *quiet],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, env=clean_env())
        if proc.returncode:
            raise UserError(f"building {BUILTIN_PREFIX}{NAME} failed at `{' '.join(cmd[2:4])}` "
                            f"(exit {proc.returncode}): see the output above; delete "
                            f"{tmp} and retry")


def ensure_builtin_model(progress: bool = True) -> Path:
    """The warm-started Megatron checkpoint root, built if absent (by one process)."""
    final = builtin_dir()
    done = final / "sft"
    if (done / "latest_checkpointed_iteration.txt").is_file():
        return done
    with _lock(cache_root() / f".{NAME}.lock"):
        if (done / "latest_checkpointed_iteration.txt").is_file():
            return done  # another process built it while we waited
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"building {BUILTIN_PREFIX}{NAME} once into {final} (tiny model, conversion, "
              "supervised warm start)", flush=True)
        _build(tmp, progress)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return done


def resolve_builtin(path: str, progress: bool = True) -> str:
    """A checkpoint path from the config: ``builtin:tiny-arithmetic`` becomes the cached
    checkpoint (built by global rank 0 while the other ranks wait); others pass through."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    if path != BUILTIN_PREFIX + NAME:
        raise UserError(f"unknown built-in model {path!r}: the only one is "
                        f"{BUILTIN_PREFIX}{NAME}")
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            ensure_builtin_model(progress)
        dist.barrier()
    return str(ensure_builtin_model(progress))
