"""HF <-> Megatron checkpoint conversion (the `convert` subcommand and tools/convert_*.py).

HF -> Megatron runs one worker per target (TP, PP) rank: under torchrun/srun the launched
ranks are the workers; from a plain process, ``tp*pp`` local CPU workers are spawned (gloo).
Each worker builds only its own model shard, reads only the HF tensors it needs (one at a
time) and writes its part of the torch_dist checkpoint, so peak host memory
stays near the model's size S in total. Megatron -> HF loads the checkpoint at TP=1/PP=1
(dist_checkpointing reshards on load) and streams HF shards out through the same live-model
exporter the rollout engines' weight sync uses (:mod:`megatron_sppo.rollout.export`).
Everything is written to a hidden sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from megatron_sppo.checkpoint.hf_io import DEFAULT_SHARD_BYTES, HFCheckpointReader, HFShardWriter
from megatron_sppo.checkpoint.hf_io import copy_non_weight_files
from megatron_sppo.checkpoint.hf_mapping import (canonical_name, hf_shapes, megatron_shard,
                                                 param_mappings)
from megatron_sppo.checkpoint.megatron_io import (describe_checkpoint, load_model_checkpoint,
                                                  save_model_checkpoint)
from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import ModelArch, arch_from_hf_config, load_hf_config
from megatron_sppo.rollout.export import iter_hf_tensors_live, layer_offset


# ---- output directories: nothing half-written ------------------------------------------


def prepare_output(path: str | Path, overwrite: bool, flag: str) -> Path:
    """Refuse an existing output unless ``overwrite``; return the temporary sibling to fill."""
    path = Path(path).absolute()
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite to replace it or choose "
                        f"another {flag}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")  # the same on every rank of a launch
    if os.environ.get("RANK", "0") == "0":
        shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def commit_output(tmp: Path, path: str | Path) -> None:
    """Move the finished ``tmp`` into place, replacing an old ``path`` only now."""
    path = Path(path).absolute()
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


# ---- model shards <-> HF tensors ------------------------------------------------------


def load_hf_weights(model, reader: HFCheckpointReader, arch: ModelArch, progress=None,
                    include_head: bool = True) -> None:
    """Fill this rank's GPTModel chunk (its TP shard and PP stage) from HF tensors.

    ``include_head=False`` leaves ``output_layer`` alone (a critic's new scalar head).
    """
    from megatron_sppo.runtime.groups import model_groups

    groups = model_groups(model)
    tp, rank = groups.tp_size, groups.tp_rank
    offset = layer_offset(model)
    mappings = {m.megatron: m for m in param_mappings(arch)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not include_head and name.startswith("output_layer."):
                continue
            mapping = mappings.get(canonical_name(name, offset))
            if mapping is None:
                raise RuntimeError(f"megatron parameter {name} has no HF mapping "
                                   f"for the {arch.family} family")
            shard = megatron_shard(mapping, [reader.get(n) for n in mapping.hf], arch, tp, rank)
            if shard.shape != param.shape:
                raise RuntimeError(f"{name}: HF gives {list(shard.shape)}, the model expects "
                                   f"{list(param.shape)}")
            param.copy_(shard)
            if progress is not None:
                progress.update(1)


def model_from_hf(hf_path: str | Path, *, tp: int = 1, pp: int = 1, critic: bool = False,
                  use_te: bool | None = None, **config_overrides):
    """(arch, TransformerConfig, this rank's GPTModel chunk) built and filled from an HF
    checkpoint, for the parallel layout already initialised (policy, or critic with its new
    scalar head). ``use_te`` picks the layer spec (default: TE when it can run);
    ``config_overrides`` go to the TransformerConfig."""
    from megatron_sppo.models.builder import build_gpt_model, transformer_config
    from megatron_sppo.models.critic import build_critic_model

    arch = arch_from_hf_config(load_hf_config(hf_path))
    config = transformer_config(arch, tp=tp, pp=pp, **config_overrides)
    model = (build_critic_model if critic else build_gpt_model)(arch, config, use_te=use_te)
    load_hf_weights(model, HFCheckpointReader(hf_path), arch, include_head=not critic)
    return arch, config, model


def _build(arch: ModelArch, tp: int, pp: int, first: int | None = None,
           last: int | None = None):
    from megatron_sppo.models.builder import build_gpt_model, transformer_config

    config = transformer_config(arch, tp=tp, pp=pp, first_stage_layers=first,
                                last_stage_layers=last, perform_initialization=False)
    return build_gpt_model(arch, config)


def _tqdm(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor")


# ---- HF -> Megatron ------------------------------------------------------------------


def _hf_to_megatron_rank(hf_path: str, tmp: str, final: str, arch: ModelArch, tp: int, pp: int,
                         stages: tuple, show_progress: bool) -> None:
    """One target rank: build its shard, fill it from HF, save it (collective)."""
    from megatron.core import parallel_state

    from megatron_sppo.runtime import enable_cpu_megatron, init_distributed

    enable_cpu_megatron(force=True)  # conversion is a host-memory job, also on GPU nodes
    init_distributed(tp, pp)
    model = _build(arch, tp, pp, *stages)
    first = torch.distributed.get_rank() == 0
    bar = _tqdm(sum(1 for _ in model.parameters()), f"hf->megatron (rank 0 of {tp * pp})",
                show_progress and first)
    load_hf_weights(model, HFCheckpointReader(hf_path), arch, bar)
    if bar is not None:
        bar.close()
    save_model_checkpoint(model, tmp, 0, arch, hf_path, release_model=True, final_root=final)
    parallel_state.destroy_model_parallel()


def _spawned_rank(rank: int, world: int, port: int, *args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _hf_to_megatron_rank(*args)
    torch.distributed.destroy_process_group()


def hf_to_megatron(hf_path: str | Path, megatron_path: str | Path, tp: int = 1, pp: int = 1,
                   overwrite: bool = False, dtype: str | None = None,
                   show_progress: bool = True, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None) -> ModelArch:
    """Convert an HF checkpoint into Megatron-LM's dist-checkpoint layout at TP=tp, PP=pp
    (``first_stage_layers``/``last_stage_layers``: uneven pipeline stages, see
    :mod:`megatron_sppo.models.stages`; the checkpoint loads at any split)."""
    arch = arch_from_hf_config(load_hf_config(hf_path))
    if dtype is not None:
        arch = dataclasses.replace(arch, dtype=dtype)
    stages = (first_stage_layers, last_stage_layers)
    arch.check_parallel(tp, pp, *stages)
    HFCheckpointReader(hf_path).check_shapes(hf_shapes(arch))
    tmp = prepare_output(megatron_path, overwrite, "--megatron-path")
    args = (str(hf_path), str(tmp), str(Path(megatron_path).absolute()), arch, tp, pp, stages,
            show_progress)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if launched > 1:
            if launched != tp * pp:
                raise UserError(f"launched with {launched} ranks for --tp {tp} --pp {pp}: "
                                f"launch {tp * pp} ranks or run it as a single process")
            _hf_to_megatron_rank(*args)
            if torch.distributed.get_rank() == 0:
                commit_output(tmp, megatron_path)
            torch.distributed.barrier()
        elif tp * pp == 1:
            _hf_to_megatron_rank(*args)
            commit_output(tmp, megatron_path)
        else:
            from megatron_sppo.runtime.distributed import free_port

            torch.multiprocessing.spawn(_spawned_rank, args=(tp * pp, free_port(), *args),
                                        nprocs=tp * pp, join=True)
            commit_output(tmp, megatron_path)
    finally:
        if tmp.exists() and (launched == 1 or torch.distributed.get_rank() == 0):
            shutil.rmtree(tmp, ignore_errors=True)
    return arch


# ---- Megatron -> HF ------------------------------------------------------------------


def megatron_to_hf(megatron_path: str | Path, hf_path: str | Path, overwrite: bool = False,
                   hf_config: str | Path | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   show_progress: bool = True) -> ModelArch:
    """Export a Megatron checkpoint (any saved TP/PP) to sharded HF safetensors."""
    from megatron_sppo.runtime import enable_cpu_megatron, init_distributed

    enable_cpu_megatron(force=True)  # before megatron-core reads the checkpoint's common state
    info = describe_checkpoint(megatron_path, hf_config)
    config_dir, arch = info.hf_dir, info.arch
    source = arch_from_hf_config(load_hf_config(config_dir))  # exported in its dtype
    if info.kind == "critic":
        raise UserError(f"{info.iter_dir} is a critic (scalar value head), which has no HF "
                        "CausalLM form: export the policy checkpoint instead")
    tmp = prepare_output(hf_path, overwrite, "--hf-path")
    try:
        init_distributed(1, 1)
        if torch.distributed.get_world_size() != 1:
            raise UserError("megatron-to-hf runs as a single process: launch it without torchrun")
        model = _build(arch, 1, 1)
        load_model_checkpoint(model, info.iter_dir)
        writer = HFShardWriter(tmp, max_shard_bytes)
        bar = _tqdm(len(hf_shapes(arch)), "megatron->hf", show_progress)
        for name, tensor in iter_hf_tensors_live(model, arch):
            writer.add(name, tensor.to(source.torch_dtype))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        writer.close()
        copy_non_weight_files(config_dir, tmp)
        commit_output(tmp, hf_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch
