"""Where a run's prompts, rewards and evaluations come from, chosen by the config:
prompt files (JSONL, Parquet, HF datasets on disk) or ``builtin:arithmetic`` (the demo's
synthetic task), the reward registry, and the held-out evaluation."""

from __future__ import annotations

from pathlib import Path

from megatron_sppo.config import Config
from megatron_sppo.errors import UserError

BUILTIN_ARITHMETIC = "builtin:arithmetic"
ARITHMETIC_TRAIN_PROMPTS = 20_000


def resolve_checkpoint_path(path: str) -> str:
    from megatron_sppo.demo.builtin import resolve_builtin

    return resolve_builtin(path)


def load_records(cfg: Config, files: list[str], split: str) -> list:
    """Prompt records from the configured files (or the built-in arithmetic task)."""
    from megatron_sppo.data.prompts import PromptRecord, load_prompt_records

    if files == [BUILTIN_ARITHMETIC]:
        from megatron_sppo.data.arithmetic import TASKS, make_prompt_records

        n = ARITHMETIC_TRAIN_PROMPTS if split == "train" else cfg.data.eval_size
        raw = make_prompt_records(n, split="train" if split == "train" else "heldout",
                                  seed=cfg.trainer.seed if split == "train" else 0,
                                  levels=TASKS[cfg.data.arithmetic_task])
        return [PromptRecord(prompt=r["prompt"], ground_truth=r["answer"],
                             data_source=r["data_source"], metadata={"level": r["level"]},
                             index=i) for i, r in enumerate(raw)]
    if BUILTIN_ARITHMETIC in files:
        raise UserError(f"data files: {BUILTIN_ARITHMETIC} cannot be mixed with files")

    def load(names):
        return load_prompt_records(names, format=cfg.data.format,
                                   instruction=cfg.data.instruction)

    if split != "eval" or len(files) == 1:
        return load(files)
    records = []
    for f in files:  # one benchmark a file: its metrics are reported one by one
        for r in load([f]):
            r.index, r.metadata["eval_file"] = len(records), Path(f).stem
            records.append(r)
    return records


def build_prompt_source(cfg: Config, tokenizer):
    from megatron_sppo.data.prompts import PromptIterator, filter_by_length

    if not cfg.data.train_files:
        raise UserError("config key data.train_files is empty: list prompt files (JSONL, "
                        f"Parquet, HF datasets on disk) or {BUILTIN_ARITHMETIC}")
    records = load_records(cfg, cfg.data.train_files, "train")
    records = filter_by_length(records, tokenizer, cfg.rollout.max_prompt_length,
                               overlong=cfg.data.overlong_prompts)
    return PromptIterator(records, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)


def build_scorer(cfg: Config):
    from megatron_sppo.rewards import RewardScorer

    return RewardScorer(cfg.reward, routes=cfg.reward.routes)
