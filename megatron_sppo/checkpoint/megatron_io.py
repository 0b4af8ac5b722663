"""Megatron-LM's checkpoint layout, written and read through megatron-core dist_checkpointing.

    <root>/latest_checkpointed_iteration.txt     the newest complete iteration
    <root>/iter_0000000/                         torch_dist shards + common.pt ({"model": ...})
    <root>/iter_0000000/megatron_sppo.json       ModelArch (padded vocabulary included)
    <root>/iter_0000000/hf_config/               the source config.json + tokenizer, unchanged

Megatron-LM loads this with ``--load <root> --use-dist-ckpt --finetune --no-load-optim
--no-load-rng``. An iteration is written to ``iter_X.partial`` and renamed when complete;
the tracker is replaced last, so a crash never leaves a tracker pointing at half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_sppo.checkpoint.hf_io import copy_non_weight_files
from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import ModelArch

TRACKER = "latest_checkpointed_iteration.txt"
META_NAME = "megatron_sppo.json"
HF_CONFIG_DIR = "hf_config"
CHECKPOINT_VERSION = 3.0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_tracker(root: str | Path, iteration: int) -> None:
    tmp = Path(root) / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, Path(root) / TRACKER)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (with the tracker) or one ``iter_*`` directory -> the iteration dir."""
    path = Path(path)
    if (path / META_NAME).is_file() or (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        raise UserError(f"{path} is not a Megatron checkpoint (no {TRACKER}): pass the "
                        "directory written by `megatron-sppo convert hf-to-megatron` or training")
    text = tracker.read_text().strip()
    if text == "release":
        return path / "release"
    try:
        return iteration_dir(path, int(text))
    except ValueError:
        raise UserError(f"{tracker} holds {text!r}, not an iteration number: fix or delete it")


def read_arch(iter_dir: str | Path) -> ModelArch:
    meta = Path(iter_dir) / META_NAME
    if not meta.is_file():
        raise UserError(f"{iter_dir} has no {META_NAME}: it was not written by megatron-sppo; "
                        f"pass --hf-config DIR with the model's original config.json and tokenizer")
    return ModelArch.from_json(json.loads(meta.read_text())["arch"])


def hf_config_dir(iter_dir: str | Path) -> Path:
    return Path(iter_dir) / HF_CONFIG_DIR


def save_model_checkpoint(model, root: str | Path, iteration: int, arch: ModelArch,
                          hf_dir: str | Path, extra_common: dict | None = None) -> Path:
    """Collective: every rank saves its shards of ``model`` (one GPTModel chunk) as
    ``<root>/iter_<iteration>``; rank 0 adds the metadata, the HF files and the tracker."""
    from megatron.core import dist_checkpointing, parallel_state

    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    state = {"model": model.sharded_state_dict(), "iteration": iteration,
             "checkpoint_version": CHECKPOINT_VERSION, **(extra_common or {})}
    dist_checkpointing.save(state, str(partial))
    if _rank0():
        meta = {"format": "megatron_sppo/1", "arch": arch.to_json(), "iteration": iteration,
                "saved_tp": parallel_state.get_tensor_model_parallel_world_size(),
                "saved_pp": parallel_state.get_pipeline_model_parallel_world_size()}
        (partial / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        copy_non_weight_files(hf_dir, partial / HF_CONFIG_DIR)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_tracker(root, iteration)
    _barrier()
    return final


def load_model_checkpoint(model, iter_dir: str | Path) -> None:
    """Collective: load ``iter_dir`` into this rank's model chunk at whatever TP/PP it has."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir))
    model.load_state_dict(state["model"], strict=True)
