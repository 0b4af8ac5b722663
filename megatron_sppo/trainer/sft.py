"""Supervised fine-tuning (warm start) with the same megatron-core machinery as RL: the
policy, schedules, optimizer and checkpoints; the loss is the token-mean negative
log-likelihood of the response tokens (the prompt is context only)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from megatron_sppo.config import ModelConfig
from megatron_sppo.errors import UserError


@dataclass
class SFTConfig:
    model: str
    data: str
    output: str
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    adam_beta2: float = 0.999
    tp: int = 1
    pp: int = 1
    max_tokens: int = 4096
    seed: int = 0
    progress: bool = True


def tokenize_sft(records: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per record: the chat template's generation prompt for the
    user turn, then the response followed by the end-of-turn token."""
    from megatron_sppo.data.prompts import chat_prompt_ids

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = tokenizer.eos_token_id if end is None or end == tokenizer.unk_token_id else end
    out = []
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise UserError(f"SFT record {i} lacks 'prompt' or 'response': each JSONL line "
                            "needs both")
        prompt = chat_prompt_ids(tokenizer, r["prompt"])
        response = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [end]
        out.append((list(prompt), response))
    return out


def sft_step(model, pairs: list[tuple[list[int], list[int]]], max_tokens: int) -> float:
    """One optimizer step on ``pairs`` (this data-parallel rank's share); returns the
    token-mean NLL over all ranks."""
    from megatron_sppo.data.batching import token_budget_microbatches
    from megatron_sppo.models.logprobs import token_logprobs_and_entropy
    from megatron_sppo.trainer.collectives import sum_stats
    from megatron_sppo.trainer.rollout_batch import pad_rollouts
    from megatron_sppo.trainer.schedule import run_microbatches

    t = pad_rollouts([p for p, _ in pairs], [r for _, r in pairs],
                     [[0.0] * len(r) for _, r in pairs])
    vocab = model.arch.vocab_size

    def loss(output, item):
        ids, mask = item
        logprobs, _ = token_logprobs_and_entropy(output[:, :-1], ids[:, 1:], vocab_size=vocab,
                                                 temperature=1.0, with_entropy=False)
        nll = -(logprobs * mask).sum()
        return nll, mask.sum(), {}

    groups = token_budget_microbatches(t.lengths.tolist(), max_tokens)
    micro = []
    for rows in groups:
        width = int(t.lengths[rows].max())
        ids = t.input_ids[rows, :width]
        micro.append((ids, t.lengths[rows], (ids, t.response_mask[rows, :width - 1])))
    model.zero_grad()
    results = run_microbatches(model.ddp, micro, loss)
    model.step()
    sums = sum_stats(results, ["loss_sum", "denominator"], model.groups)
    return sums["loss_sum"] / max(sums["denominator"], 1)


def run_sft(cfg: SFTConfig) -> Path:
    """Train and save a Megatron policy checkpoint at ``cfg.output``; returns its path."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_sppo.checkpoint.megatron_io import save_model_checkpoint
    from megatron_sppo.data.arithmetic import read_jsonl
    from megatron_sppo.runtime import init_distributed
    from megatron_sppo.trainer.collectives import data_parallel_rows
    from megatron_sppo.trainer.models import build_trained_model

    init_distributed(cfg.tp, cfg.pp, cfg.seed)
    model = build_trained_model("policy", ModelConfig(
        checkpoint=cfg.model, tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp, lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_style="cosine", clip_grad=1.0,
        adam_beta2=cfg.adam_beta2),
        cfg.model, cfg.steps)
    tokenizer = AutoTokenizer.from_pretrained(model.hf_dir)
    pairs = tokenize_sft(read_jsonl(cfg.data), tokenizer)
    if not pairs:
        raise UserError(f"SFT data {cfg.data} is empty")
    rng = random.Random(cfg.seed)
    bar = None
    if cfg.progress and dist.get_rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="sft", unit="step", dynamic_ncols=True)
    for _ in range(cfg.steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(cfg.batch_size)]
        mine = data_parallel_rows(list(range(len(batch))), model.groups)
        nll = sft_step(model, [batch[i] for i in mine], cfg.max_tokens)
        if bar is not None:
            bar.set_postfix(nll=f"{nll:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return save_model_checkpoint(model.module, cfg.output, cfg.steps, model.arch, model.hf_dir)
