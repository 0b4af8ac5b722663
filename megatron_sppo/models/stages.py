"""How a model's decoder layers are split over pipeline stages, with Megatron-LM's semantics.

Megatron-LM's ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``
(megatron-core's ``TransformerConfig.num_layers_in_first/last_pipeline_stage``) fix the layer
count of the first and/or the last stage; the stages not fixed share the remaining layers
evenly. Given neither, a pipeline size that divides the layer count splits evenly (megatron's
default); one that does not gets the default split here: every stage ``L // pp`` layers, the
first stage the remainder as well (it holds only the embedding, while the last stage also
holds the output layer and the loss). Checkpoints do not depend on the split: layers are
stored under global numbers, so a checkpoint written at one split loads at any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sppo.errors import UserError

# how the pipeline size and the two stage sizes are spelled in messages
CLI_NAMES = ("--pp", "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers")


def config_names(prefix: str) -> tuple[str, str, str]:
    """The names of the same three settings in a training config section."""
    return (f"{prefix}.pipeline_model_parallel_size", f"{prefix}.decoder_first_pipeline_num_layers",
            f"{prefix}.decoder_last_pipeline_num_layers")


@dataclass(frozen=True)
class StageSplit:
    """The first and last stage's layer counts (None: an evenly shared stage)."""

    first: int | None = None
    last: int | None = None

    def config_kwargs(self) -> dict:
        """The TransformerConfig fields (empty for an even split)."""
        out = {}
        if self.first is not None:
            out["num_layers_in_first_pipeline_stage"] = self.first
        if self.last is not None:
            out["num_layers_in_last_pipeline_stage"] = self.last
        return out


def stage_split(num_layers: int, pp: int, first: int | None = None, last: int | None = None,
                names: tuple[str, str, str] = CLI_NAMES) -> StageSplit:
    """Check the user's stage sizes (``names`` spell pp, first and last in messages) or choose
    the default split; raises UserError for a split megatron-core would refuse."""
    pp_name, names = names[0], names[1:]
    if pp > num_layers:
        raise UserError(f"{pp_name} {pp} is more than num_hidden_layers={num_layers}: every "
                        f"pipeline stage needs a layer; use {pp_name} <= {num_layers}")
    if pp == 1:
        if first is not None or last is not None:
            raise UserError(f"{names[0]}/{names[1]} need {pp_name} > 1: drop them")
        return StageSplit()
    if first is None and last is None:
        if num_layers % pp == 0:
            return StageSplit()
        return StageSplit(first=num_layers // pp + num_layers % pp)
    for name, value in zip(names, (first, last)):
        if value is not None and value < 1:
            raise UserError(f"{name}={value}: a stage needs at least one layer")
    rest = num_layers - (first or 0) - (last or 0)
    shared = pp - (first is not None) - (last is not None)
    if (shared == 0 and rest != 0) or (shared > 0 and (rest < shared or rest % shared)):
        given = " and ".join(f"{n}={v}" for n, v in zip(names, (first, last)) if v is not None)
        raise UserError(f"{given} leave {rest} of the {num_layers} layers to {shared} other "
                        f"pipeline stage(s) of {pp_name} {pp}, which must share them evenly "
                        f"(at least one each): choose stage sizes that do")
    return StageSplit(first, last)


def layers_per_stage(num_layers: int, pp: int, split: StageSplit) -> list[int]:
    """The layer count of every stage, first to last."""
    fixed = {0: split.first, pp - 1: split.last}
    fixed = {stage: n for stage, n in fixed.items() if n is not None}
    shared = pp - len(fixed)
    each = (num_layers - sum(fixed.values())) // shared if shared else 0
    return [fixed.get(stage, each) for stage in range(pp)]
