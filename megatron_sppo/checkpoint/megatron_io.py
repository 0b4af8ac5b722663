"""Megatron-LM's checkpoint layout, written and read through megatron-core dist_checkpointing.

    <root>/latest_checkpointed_iteration.txt     the newest complete iteration
    <root>/iter_0000000/                         torch_dist shards; common state: iteration,
                                                 checkpoint_version, Megatron-LM's ``args``
    <root>/iter_0000000/megatron_sppo.json       ModelArch (padded vocabulary included)
    <root>/iter_0000000/run_config.yaml          the same facts in Megatron-Bridge's layout
    <root>/iter_0000000/hf_config/               the source config.json + tokenizer, unchanged

Megatron-LM loads this with ``--load <root> --use-checkpoint-args --finetune --no-load-optim
--no-load-rng`` (:mod:`megatron_sppo.checkpoint.interop` says which flags it still needs).
An iteration is written to ``iter_X.partial`` and renamed when complete; the tracker is
replaced last, so a crash never leaves a tracker pointing at half a checkpoint.

:func:`describe_checkpoint` reads this layout back, and also checkpoints Megatron-LM saved
(``args`` in the common state) or Megatron-Bridge saved (``run_config.yaml``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CheckpointInfo:
    """What a Megatron checkpoint holds, whoever wrote it. ``arch`` carries this project's
    padded vocabulary size: megatron-core loads any stored padding into a model built with it
    (rows past the stored ones stay zero, extra stored rows are left out)."""

    iter_dir: Path
    hf_dir: Path  # the model's config.json and tokenizer
    arch: ModelArch
    kind: str  # "policy" or "critic"
    writer: str  # "megatron_sppo", "megatron-lm" or "megatron-bridge"


def _first_hf_dir(candidates, iter_dir: Path, writer: str) -> Path:
    """The first candidate directory holding a config.json. A relative path (Megatron-LM
    records ``--tokenizer-model`` as given) is tried from the current directory and from each
    directory above the checkpoint, where the run that wrote it may have started."""
    candidates = list(dict.fromkeys(str(c) for c in candidates if c is not None))
    for candidate in candidates:
        bases = ([Path()] if Path(candidate).is_absolute()
                 else [Path.cwd(), *iter_dir.absolute().parents])
        for base in bases:
            if (base / candidate / "config.json").is_file():
                return base / candidate
    named = ", ".join(candidates) or "none"
    raise UserError(f"{iter_dir} ({writer} checkpoint) names no HF config.json that exists "
                    f"(looked in: {named}): pass --hf-config DIR to convert, or copy the "
                    f"model's original config.json and tokenizer into {iter_dir}/{HF_CONFIG_DIR}")


def describe_checkpoint(path: str | Path, hf_config: str | Path | None = None) -> CheckpointInfo:
    """Read a checkpoint written by megatron-sppo (``megatron_sppo.json``), Megatron-LM (``args``
    in the common state) or Megatron-Bridge (``run_config.yaml``): find the HF config and
    tokenizer it was made from (``hf_config`` overrides) and check that config against the
    architecture the checkpoint records."""
    from megatron_sppo.checkpoint import interop
    from megatron_sppo.models.hf_config import arch_from_hf_config, load_hf_config

    iter_dir = resolve_checkpoint(path)
    own = hf_config_dir(iter_dir)
    if (iter_dir / META_NAME).is_file():
        meta = read_meta(iter_dir)
        stored = ModelArch.from_json(meta["arch"])
        config_dir = _first_hf_dir([hf_config, own], iter_dir, "megatron-sppo")
        arch = stored if hf_config is None else arch_from_hf_config(load_hf_config(config_dir))
        facts = {k: getattr(stored, k) for k in ("num_layers", "hidden_size", "num_heads",
                                                 "num_kv_heads", "head_dim", "vocab_size")}
        interop.check_facts(arch, facts, iter_dir, config_dir)
        return CheckpointInfo(iter_dir, config_dir, arch, meta.get("model", "policy"),
                              "megatron_sppo")
    if (iter_dir / interop.RUN_CONFIG).is_file():
        writer = "megatron-bridge"
        run_config = interop.read_run_config(iter_dir / interop.RUN_CONFIG)
        facts = interop.facts_from_run_config(run_config)
        named = interop.hf_dirs_named_in_run_config(run_config)
    else:
        args = _common_state(iter_dir).get("args")
        if args is None and hf_config is None:
            raise UserError(f"{iter_dir} records no model (no {META_NAME}, {interop.RUN_CONFIG} "
                            "or Megatron-LM args): pass --hf-config DIR with the model's "
                            "original config.json and tokenizer")
        writer = "megatron-lm"
        facts = interop.facts_from_args(args) if args is not None else {}
        named = [getattr(args, "tokenizer_model", None)]
    config_dir = _first_hf_dir([hf_config, own, *named], iter_dir, writer)
    arch = arch_from_hf_config(load_hf_config(config_dir))
    interop.check_facts(arch, facts, iter_dir, config_dir)
    _check_stored_vocab(iter_dir, arch)
    return CheckpointInfo(iter_dir, config_dir, arch, "policy", writer)


def _common_state(iter_dir: Path) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(iter_dir))


def _check_stored_vocab(iter_dir: Path, arch: ModelArch) -> None:
    """A checkpoint stored with fewer vocabulary rows than the tokenizer has is another model."""
    from megatron.core import dist_checkpointing

    shapes = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    embedding = shapes.get("embedding.word_embeddings.weight")
    if embedding is not None and embedding.global_shape[0] < arch.vocab_size:
        raise UserError(f"{iter_dir} stores {embedding.global_shape[0]} vocabulary rows, fewer "
                        f"than the vocab_size={arch.vocab_size} of its config.json: pass "
                        "--hf-config DIR with the model's own config.json and tokenizer")


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
                          release_model: bool = False, final_root: str | Path | None = None,
                          ) -> Path:
    """Collective: every rank saves its shards of ``model`` (one GPTModel chunk) as
    ``<root>/iter_<iteration>``; rank 0 adds the metadata, the HF files and the tracker.

    ``release_model=True`` (conversion) frees parameters as the writer takes them over, so
    saving needs no second copy of the model; the model must not be used afterwards.
    ``final_root``: where ``root`` will be moved once complete (the tokenizer path recorded for
    Megatron-LM and Bridge is absolute, so it must name the final place).
    """
    from megatron.core import dist_checkpointing

    from megatron_sppo.checkpoint.interop import (RUN_CONFIG, bridge_run_config,
                                                  megatron_lm_args, write_run_config)
    from megatron_sppo.models.critic import ScalarHead
    from megatron_sppo.models.stages import StageSplit
    from megatron_sppo.runtime.groups import model_groups

    groups = model_groups(model)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    published = iteration_dir(Path(final_root or root).absolute(), iteration)
    split = StageSplit(model.config.num_layers_in_first_pipeline_stage,
                       model.config.num_layers_in_last_pipeline_stage)
    layout = (groups.tp_size, groups.pp_size, split)
    kind = "critic" if isinstance(getattr(model, "output_layer", None), ScalarHead) else "policy"
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    state = {"model": groups.sharded_state_dict(model), "iteration": iteration,
             "checkpoint_version": CHECKPOINT_VERSION, **(extra_common or {})}
    if kind == "policy":  # a critic (scalar head) is no model Megatron-LM or Bridge can build
        state["args"] = megatron_lm_args(arch, published / HF_CONFIG_DIR, *layout)
    if release_model:
        _hand_views_to_writer(state)
    dist_checkpointing.save(state, str(partial))
    if _rank0():
        meta = {"format": "megatron_sppo/1", "arch": arch.to_json(), "iteration": iteration,
                "model": kind, "saved_tp": groups.tp_size, "saved_pp": groups.pp_size}
        (partial / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if kind == "policy":
            write_run_config(partial / RUN_CONFIG, bridge_run_config(
                arch, published / HF_CONFIG_DIR, published.parent, *layout))
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
