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

import torch
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


def read_meta(iter_dir: str | Path) -> dict:
    meta = Path(iter_dir) / META_NAME
    if not meta.is_file():
        raise UserError(f"{iter_dir} has no {META_NAME}: it was not written by megatron-sppo; "
                        f"pass --hf-config DIR with the model's original config.json and tokenizer")
    return json.loads(meta.read_text())


def read_arch(iter_dir: str | Path) -> ModelArch:
    return ModelArch.from_json(read_meta(iter_dir)["arch"])


def hf_config_dir(iter_dir: str | Path) -> Path:
    return Path(iter_dir) / HF_CONFIG_DIR


def _hand_views_to_writer(state: dict) -> None:
    """Give the checkpoint writer its own copy of every shard that is a view of a larger
    parameter (SwiGLU's gate/up halves of linear_fc1), freeing that parameter right away.

    The torch_dist writer clones views itself, which would hold a second copy of those
    weights while the model is still alive; this does it one parameter at a time instead.
    The model's parameters are unusable afterwards.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)
    by_storage: dict[int, list] = {}
    for value in nested_values(state):
        if isinstance(value, ShardedTensor) and value.data is not None:
            by_storage.setdefault(value.data.untyped_storage().data_ptr(), []).append(value)
    for shards in by_storage.values():
        storage = shards[0].data.untyped_storage()
        if all(sh.data.nbytes == storage.nbytes() and sh.data.is_contiguous() for sh in shards):
            continue
        for sh in shards:
            sh.data = sh.data.clone()
        storage.resize_(0)


def save_model_checkpoint(model, root: str | Path, iteration: int, arch: ModelArch,
                          hf_dir: str | Path, extra_common: dict | None = None,
                          release_model: bool = False) -> Path:
    """Collective: every rank saves its shards of ``model`` (one GPTModel chunk) as
    ``<root>/iter_<iteration>``; rank 0 adds the metadata, the HF files and the tracker.

    ``release_model=True`` (conversion) frees parameters as the writer takes them over, so
    saving needs no second copy of the model; the model must not be used afterwards.
    """
    from megatron.core import dist_checkpointing

    from megatron_sppo.runtime.groups import model_groups

    groups = model_groups(model)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    state = {"model": groups.sharded_state_dict(model), "iteration": iteration,
             "checkpoint_version": CHECKPOINT_VERSION, **(extra_common or {})}
    if release_model:
        _hand_views_to_writer(state)
    dist_checkpointing.save(state, str(partial))
    if _rank0():
        from megatron_sppo.models.critic import ScalarHead

        head = getattr(model, "output_layer", None)
        meta = {"format": "megatron_sppo/1", "arch": arch.to_json(), "iteration": iteration,
                "model": "critic" if isinstance(head, ScalarHead) else "policy",
                "saved_tp": groups.tp_size, "saved_pp": groups.pp_size}
        (partial / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        copy_non_weight_files(hf_dir, partial / HF_CONFIG_DIR)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_tracker(root, iteration)
    _barrier()
    return final


def load_model_checkpoint(model, iter_dir: str | Path, skip_prefix: str | None = None) -> None:
    """Collective: load ``iter_dir`` into this rank's model chunk at whatever TP/PP it has.

    The shards are read straight into the parameters (factories such as SwiGLU's gate/up
    split are applied first, so no merged copy of linear_fc1 is ever materialised).
    ``skip_prefix`` leaves those parameters as they are (a critic's new head when its
    backbone comes from a policy checkpoint).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_sppo.runtime.groups import model_groups

    state = model_groups(model).sharded_state_dict(model)
    if skip_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(skip_prefix)}
    sharded = {"model": state}
    apply_factories(sharded)
    loaded = dist_checkpointing.load(sharded, str(iter_dir))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for tensor in nested_values(loaded["model"]):
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in params:
            raise RuntimeError("dist_checkpointing returned a tensor that is not a view of a "
                               "parameter: the in-place load assumption no longer holds")
