"""Training checkpoints: policy, critic, both optimizers and schedulers, the data position
and the step, through megatron-core's dist_checkpointing (so a run resumes at another
data-parallel size), written atomically.

Layout: ``<output_dir>/checkpoints/step_0000010/`` plus ``checkpoints/latest`` (the name of
the newest complete checkpoint, written only after it is renamed into place); older ones
are removed beyond ``keep_last``. A save writes ``step_0000010.partial/`` first; one left by a
run killed while saving is removed when the next run starts. RNG state needs no saving: every random draw of a step is
seeded from (trainer.seed, step), so a resumed step draws exactly what the original did.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sppo.errors import UserError
from megatron_sppo.runtime.signals import shielded_spawn

LATEST = "latest"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _sharded(models: dict, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    state = {}
    for name, model in models.items():
        model_sd = model.groups.sharded_state_dict(model.module, prefix=f"{name}.")
        state[name] = model_sd
        optimizer_sd = model.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_metadata(model))
        if model.ddp.ddp_config.use_distributed_optimizer:
            # its buffer keys name no model: the policy's and the critic's would collide
            add_prefix_for_sharding(optimizer_sd, f"{name}.")
        state[f"{name}_optimizer"] = optimizer_sd
    return state


def _optimizer_metadata(model) -> dict:
    """How the distributed optimizer shards its state: Megatron-LM's default layout
    (``dp_reshardable``: each rank writes its own buffers; resumable at another
    data-parallel size, not another TP/PP), over the model's own data-parallel group.
    megatron-core's own default, ``fully_sharded_model_space``, is deprecated and cannot be
    saved by its dist-checkpointing ("ShardedTensor.flattened_range is not supported")."""
    return {"distrib_optim_sharding_type": "dp_reshardable",
            "dp_cp_group": model.groups.pg.dp_cp}


def save_training_checkpoint(output_dir: str | Path, step: int, models: dict,
                             common: dict, keep_last: int) -> Path:
    """Collective. ``models``: {"policy": TrainedModel, "critic": ...}; ``common``: picklable
    run state (data position, counters) saved once."""
    from megatron.core import dist_checkpointing

    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:07d}"
    partial = final.with_name(final.name + ".partial")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    state = _sharded(models, is_loading=False)
    state["run"] = {**common, "step": step,
                    "schedulers": {n: m.scheduler.state_dict() for n, m in models.items()}}
    start_checkpoint_writer()
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        os.replace(tmp, root / LATEST)
        for old in sorted(root.glob("step_*[0-9]"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def start_checkpoint_writer() -> None:
    """megatron-core's torch_dist writer hands its results back through a multiprocessing
    Manager process that it spawns at the first save and keeps in a module global
    (``get_write_results_queue``, dist_checkpointing/strategies/filesystem_async.py,
    megatron-core 0.19.2). Started here instead, shielded from the stop signals, it survives
    the signal whose checkpoint it is writing; the trainer starts it before its first step,
    so that the spawn (seconds: the child imports the trainer's modules) is not paid inside
    a signal's lead time."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with shielded_spawn():
        filesystem_async.get_write_results_queue()


def remove_partial_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete the ``*.partial`` directories of saves that never completed; their names."""
    root = checkpoints_dir(output_dir)
    names = sorted(p.name for p in root.glob("step_*.partial"))
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True)
    return names


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None for a fresh run)."""
    marker = checkpoints_dir(output_dir) / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    if not path.is_dir():
        raise UserError(f"{marker} names {path.name}, which is missing: restore it or delete "
                        "the marker to start over")
    return path


@torch.no_grad()  # optimizer states load in place into parameter shards
def load_training_checkpoint(path: str | Path, models: dict) -> dict:
    """Collective: load models, optimizers and schedulers in place; returns the run state."""
    from megatron.core import dist_checkpointing

    for model in models.values():
        _materialize_distributed_optimizer(model.optimizer)
    sharded = _sharded(models, is_loading=True)
    sharded["run"] = None  # common entries come back as saved
    loaded = dist_checkpointing.load({k: v for k, v in sharded.items() if v is not None},
                                     str(path))
    from megatron.core.dist_checkpointing import load_common_state_dict

    run = load_common_state_dict(str(path))["run"]
    for name, model in models.items():
        model.module.load_state_dict(_strip(loaded[name], f"{name}."), strict=False)
        model.optimizer.load_state_dict(loaded[f"{name}_optimizer"])
        _restore_adam_steps(model.optimizer)
        model.scheduler.load_state_dict(run["schedulers"][name])
    return run


def _materialize_distributed_optimizer(optimizer) -> None:
    """A distributed optimizer that has not stepped yet gets placeholder states to load into
    (megatron-core's own ``_init_optimizer_states_with_dummy_values``): without Apex or
    Transformer Engine its ``state_dict()`` reads the step count from them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """torch Adam's per-parameter ``step`` after a distributed-optimizer load. Without Apex or
    Transformer Engine megatron-core 0.19 gives every parameter the same step tensor (so each
    later step is counted once per parameter) and then copies the placeholder's value over
    it with the other state tensors (``_set_main_param_and_optimizer_states``); the param
    groups keep the saved count. One tensor per parameter, as torch's Adam keeps them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        steps = {g["step"] for g in opt.optimizer.param_groups if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.full_like(state["step"], step)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
