"""The process groups one model runs on: megatron-core's global ones (the policy's layout) or
a set of its own over the same ranks (a critic with another TP/PP than the policy).

megatron-core 0.19 threads a ``ProcessGroupCollection`` through GPTModel, DDP, the optimizer,
``finalize_model_grads`` and the pipeline schedules, so two models on the same ranks can each
use their own tensor/pipeline/data-parallel groups. The groups here are made the way
``parallel_state.initialize_model_parallel`` makes its default ones (rank order tp-cp-dp-pp,
checked against megatron-core 0.19.2 ``inference/shards.py::build_inference_pg_collection``,
which builds a collection per model the same way): with a 4-rank world, TP=2 groups [0, 1] and
[2, 3]; TP=1 x DP=4 one data-parallel group [0, 1, 2, 3].

Whatever runs a model asks it for its groups (:func:`model_groups`), so no caller needs to
know which layout a model has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

_OWN: dict[tuple[int, int, int], object] = {}  # (world, tp, pp) -> collection, made once


@dataclass(frozen=True)
class ModelGroups:
    """A model's ProcessGroupCollection; ``own`` when made for it rather than megatron's
    global groups (the optimizer is then told, and uses no gloo side groups)."""

    pg: object
    own: bool = False

    @property
    def tp_size(self) -> int:
        return self.pg.tp.size()

    @property
    def tp_rank(self) -> int:
        return self.pg.tp.rank()

    @property
    def pp_size(self) -> int:
        return self.pg.pp.size()

    @property
    def pp_rank(self) -> int:
        return self.pg.pp.rank()

    @property
    def dp_size(self) -> int:
        return self.pg.dp.size()

    @property
    def dp_rank(self) -> int:
        return self.pg.dp.rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def optimizer_kwargs(self) -> dict:
        """What ``get_megatron_optimizer`` needs to run on these groups."""
        return dict(pg_collection=self.pg, use_gloo_process_groups=False) if self.own else {}

    def sharded_state_dict(self, module, prefix: str = "") -> dict:
        """``module.sharded_state_dict`` with replica ids over this model's data-parallel
        group (megatron-core falls back to the global one otherwise)."""
        return module.sharded_state_dict(prefix=prefix, metadata={"dp_cp_group": self.pg.dp_cp})


def global_groups() -> ModelGroups:
    """megatron-core's global groups (``parallel_state``), as GPTModel uses them by default."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ModelGroups(ProcessGroupCollection.use_mpu_process_groups())


def groups_for_layout(tp: int, pp: int) -> ModelGroups:
    """Collective over all ranks: the global groups when (tp, pp) is the layout megatron's
    parallel state was initialised with, else this layout's own groups (made once per
    layout and reused by every later model at it)."""
    from megatron.core import parallel_state

    if (tp, pp) == (parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size()):
        return global_groups()
    key = (dist.get_world_size(), tp, pp)
    if key not in _OWN:
        _OWN[key] = _build_collection(*key)
    return ModelGroups(_OWN[key], own=True)


def _build_collection(world: int, tp: int, pp: int):
    """A dense model's groups at TP=tp, PP=pp, DP=world/(tp*pp), CP=EP=1 (every rank joins
    every ``new_group`` call, as torch.distributed requires)."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp*pp={tp * pp}")
    grid = HyperCommGrid([tp, 1, world // (tp * pp), pp], ["tp", "cp", "dp", "pp"])
    groups = {name: grid.create_pg(dims) for name, dims in (
        ("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("mp", ["tp", "pp"]),
        ("tp_cp", ["tp", "cp"]), ("dp_cp", ["cp", "dp"]), ("tp_dp_cp", ["tp", "cp", "dp"]),
        # one distributed-optimizer instance spans the world (its grad-norm reductions)
        ("intra_dist_opt", ["tp", "cp", "dp", "pp"]))}
    rank = dist.get_rank()
    for name, stage_ranks in (("embd", lambda r: sorted({r[0], r[-1]})),
                              ("pos_embd", lambda r: [r[0]])):
        for pp_ranks in grid.get_rank_enum("pp"):
            ranks = stage_ranks(pp_ranks)
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                groups[name] = group
        groups.setdefault(name, None)
    # dense models: the expert groups are the dense ones (no expert parallelism)
    groups.update(ep=groups["cp"], expt_tp=groups["tp"], expt_dp=groups["dp"],
                  tp_ep=groups["tp"], tp_ep_pp=groups["mp"])
    return ProcessGroupCollection(**groups)


def model_groups(model) -> ModelGroups:
    """The groups a (possibly DDP/Float16Module-wrapped) GPTModel chunk was built with;
    megatron's global groups for a module that records none."""
    while not hasattr(model, "pg_collection") and hasattr(model, "module"):
        model = model.module
    pg = getattr(model, "pg_collection", None)
    if pg is None:
        return global_groups()
    return ModelGroups(pg, own=any(pg is own for own in _OWN.values()))

