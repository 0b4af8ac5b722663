"""Build a trainable Megatron model (policy or critic) from its config section: the GPTModel
filled from an HF or Megatron checkpoint, wrapped in DDP, with the Megatron optimizer and the
LR/weight-decay scheduler (warm-up, decay), all at the launched layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sppo.config import ModelConfig
from megatron_sppo.data.packing import SequenceLayout
from megatron_sppo.errors import UserError
from megatron_sppo.models.hf_config import ModelArch
from megatron_sppo.runtime.groups import ModelGroups, model_groups

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainedModel:
    """One model under training: ``ddp`` is what schedules run; ``module`` the GPTModel chunk.
    ``hf_dir`` holds the HF config and tokenizer (for exports and the rollout engine)."""

    kind: str
    arch: ModelArch
    config: object
    module: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: object
    scheduler: object
    hf_dir: Path
    groups: ModelGroups
    layout: SequenceLayout = SequenceLayout()  # padded rows or THD packs (sequence_layout)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float]:
        """Optimizer step (clipping inside) then the scheduler; returns (applied, grad_norm).
        A non-finite gradient makes megatron-core skip the update and report it."""
        applied, grad_norm, _ = self.optimizer.step()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        applied = bool(applied) and grad_norm == grad_norm and grad_norm != float("inf")
        if applied:
            self.scheduler.step(increment=1)
        return applied, grad_norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def transformer_overrides(cfg: ModelConfig, num_layers: int, prefix: str = "policy") -> dict:
    """The TransformerConfig settings the trainer needs (per-token loss, variable lengths)
    plus the memory and FP8 settings of the config section."""
    overrides = dict(calculate_per_token_loss=True, variable_seq_lengths=True,
                     moe_token_dispatcher_type="alltoall",
                     sequence_parallel=cfg.sequence_parallel,
                     **cfg.fp8.transformer_config_kwargs(
                         num_layers, cfg.pipeline_model_parallel_size, f"{prefix}.fp8"))
    if cfg.recompute_granularity:
        overrides.update(recompute_granularity=cfg.recompute_granularity,
                         recompute_method=cfg.recompute_method,
                         recompute_num_layers=cfg.recompute_num_layers
                         if cfg.recompute_num_layers is not None else 1)
    return overrides


def sequence_layout(cfg: ModelConfig) -> SequenceLayout:
    """How micro-batches reach the model: THD packs on the Transformer Engine path (unless
    ``sequence_packing`` is off), padded rows otherwise; either way sequences are aligned to
    FP8's token multiple and to the TP split of sequence parallelism."""
    from megatron_sppo.models.builder import use_transformer_engine
    from megatron_sppo.quant.fp8_train import sequence_multiple

    align = sequence_multiple(cfg.fp8.recipe if cfg.fp8.format else None,
                              cfg.tensor_model_parallel_size, cfg.sequence_parallel)
    return SequenceLayout(align, packed=cfg.sequence_packing and use_transformer_engine())


def checkpoint_source(path: str) -> tuple[Path, Path | None, str]:
    """(HF files dir, Megatron iteration dir or None, "policy" or "critic") of an HF checkpoint
    or a Megatron one (written by megatron-sppo, Megatron-LM or Megatron-Bridge)."""
    from megatron_sppo.checkpoint.megatron_io import describe_checkpoint

    p = Path(path)
    if (p / "config.json").is_file():
        return p, None, "policy"
    if p.is_dir():
        info = describe_checkpoint(p)
        return info.hf_dir, info.iter_dir, info.kind
    raise UserError(f"checkpoint {path} does not exist: give an HF model directory (with "
                    "config.json) or a Megatron checkpoint (megatron-sppo, Megatron-LM, Bridge)")


def build_trained_model(kind: str, cfg: ModelConfig, checkpoint: str,
                        total_steps: int) -> TrainedModel:
    """Collective over all ranks: model + DDP + optimizer + scheduler for ``kind``
    ("policy" or "critic"; a critic gets a new scalar head, its backbone from ``checkpoint``)."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    critic = kind == "critic"
    module, arch = build_module(cfg, checkpoint, critic=critic, prefix=kind)
    hf_dir = checkpoint_source(checkpoint)[0]
    config, dtype = module.config, DTYPES[cfg.params_dtype]
    groups = model_groups(module)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer),
        module=module, pg_collection=groups.pg)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        params_dtype=dtype, use_distributed_optimizer=cfg.use_distributed_optimizer,
        optimizer_cpu_offload=cfg.optimizer_cpu_offload), [ddp], **groups.optimizer_kwargs())
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr,
        min_lr=cfg.min_lr, lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=max(total_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
    return TrainedModel(kind, arch, config, module, ddp, optimizer, scheduler, hf_dir, groups,
                        sequence_layout(cfg))


def build_module(cfg: ModelConfig, checkpoint: str, *, critic: bool = False,
                 frozen: bool = False, prefix: str = "policy"
                 ) -> tuple[torch.nn.Module, ModelArch]:
    """Collective: this rank's GPTModel chunk (policy, or critic with a new scalar head) at the
    config's layout, on megatron's global groups when that is the launched layout and on
    groups of its own otherwise (:mod:`megatron_sppo.runtime.groups`), filled from an HF or
    Megatron checkpoint; ``frozen`` for forward-only use (the reference policy)."""
    from megatron_sppo.checkpoint.convert import load_hf_weights
    from megatron_sppo.checkpoint.hf_io import HFCheckpointReader
    from megatron_sppo.checkpoint.megatron_io import load_model_checkpoint
    from megatron_sppo.models.builder import build_gpt_model, transformer_config
    from megatron_sppo.models.critic import build_critic_model
    from megatron_sppo.models.hf_config import arch_from_hf_config, load_hf_config
    from megatron_sppo.models.stages import config_names
    from megatron_sppo.runtime.groups import groups_for_layout

    hf_dir, iter_dir, stored_kind = checkpoint_source(checkpoint)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    stages = (cfg.decoder_first_pipeline_num_layers, cfg.decoder_last_pipeline_num_layers)
    arch.check_parallel(tp, pp, *stages, names=config_names(prefix))
    config = transformer_config(arch, tp=tp, pp=pp, params_dtype=DTYPES[cfg.params_dtype],
                                first_stage_layers=stages[0], last_stage_layers=stages[1],
                                **transformer_overrides(cfg, arch.num_layers, prefix))
    module = (build_critic_model if critic else build_gpt_model)(
        arch, config, groups=groups_for_layout(tp, pp))
    if iter_dir is None:
        load_hf_weights(module, HFCheckpointReader(hf_dir), arch, include_head=not critic)
    else:  # a critic may start from a policy checkpoint: backbone loaded, new head kept
        from_policy = critic and stored_kind != "critic"
        load_model_checkpoint(module, iter_dir,
                              skip_prefix="output_layer." if from_policy else None)
    if frozen:
        module.eval().requires_grad_(False)
    return module, arch
