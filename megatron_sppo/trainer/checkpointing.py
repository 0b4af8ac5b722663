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

import torch.distributed as dist

from megatron_sppo.errors import UserError
from megatron_sppo.runtime.signals import shielded_spawn

LATEST = "latest"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _sharded(models: dict, is_loading: bool) -> dict:
    state = {}
    for name, model in models.items():
        model_sd = model.groups.sharded_state_dict(model.module, prefix=f"{name}.")
        state[name] = model_sd
        state[f"{name}_optimizer"] = model.optimizer.sharded_state_dict(model_sd,
                                                                        is_loading=is_loading)
    return state


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


def load_training_checkpoint(path: str | Path, models: dict) -> dict:
    """Collective: load models, optimizers and schedulers in place; returns the run state."""
    from megatron.core import dist_checkpointing

    sharded = _sharded(models, is_loading=True)
    sharded["run"] = None  # common entries come back as saved
    loaded = dist_checkpointing.load({k: v for k, v in sharded.items() if v is not None},
                                     str(path))
    from megatron.core.dist_checkpointing import load_common_state_dict

    run = load_common_state_dict(str(path))["run"]
    for name, model in models.items():
        model.module.load_state_dict(_strip(loaded[name], f"{name}."), strict=False)
        model.optimizer.load_state_dict(loaded[f"{name}_optimizer"])
        model.scheduler.load_state_dict(run["schedulers"][name])
    return run


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
