"""Prompt data for RL: records from JSONL, Parquet or HF ``datasets`` saved to disk, in the
common RL layouts, and a deterministic, resumable iterator over them.

Layouts (auto-detected from the first record, or forced by ``format``):
- ``verl``: ``prompt`` is a chat-messages list, ``reward_model.ground_truth``,
  ``data_source`` (verl's parquet; DAPO-Math-17k ships in it);
- ``deepscaler``: ``{problem, answer}``;  ``math``: ``{problem, solution}`` (the boxed
  answer of the solution is the ground truth);  ``plain``: ``{prompt, answer}``.
Text prompts get the configured instruction appended; verl prompts are used as given.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sppo.errors import UserError

FORMATS = ("auto", "verl", "deepscaler", "math", "plain")


@dataclass
class PromptRecord:
    """One prompt: ``prompt`` is text (a user turn) or a chat-messages list."""

    prompt: str | list
    ground_truth: str
    data_source: str = "math"
    metadata: dict = field(default_factory=dict)
    index: int = 0


def _read_rows(path: Path) -> list[dict]:
    if path.is_dir():  # HF datasets' save_to_disk: arrow stream files + dataset_info.json
        import pyarrow as pa

        files = sorted(path.glob("*.arrow")) or sorted(path.glob("*/*.arrow"))
        if not files:
            raise UserError(f"{path} is a directory without .arrow files: give a JSONL or "
                            "Parquet file, or a directory written by datasets.save_to_disk")
        rows = []
        for f in files:
            with pa.memory_map(str(f)) as source:
                rows += pa.ipc.open_stream(source).read_all().to_pylist()
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        try:
            return ([json.loads(line) for line in text.splitlines() if line.strip()]
                    if path.suffix == ".jsonl" else json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
    raise UserError(f"{path}: unknown file type; use .jsonl, .json, .parquet or a "
                    "datasets.save_to_disk directory")


def detect_format(row: dict) -> str:
    if isinstance(row.get("prompt"), list) and isinstance(row.get("reward_model"), dict):
        return "verl"
    if "problem" in row and "answer" in row:
        return "deepscaler"
    if "problem" in row and "solution" in row:
        return "math"
    if "prompt" in row and "answer" in row:
        return "plain"
    raise UserError(f"cannot tell the layout of a record with fields {sorted(row)}: expected "
                    "verl (prompt messages + reward_model.ground_truth), {problem, answer}, "
                    "{problem, solution} or {prompt, answer}")


def _record(row: dict, fmt: str, instruction: str, index: int) -> PromptRecord:
    from megatron_sppo.rewards.math import last_boxed

    def text(t: str) -> str:
        return f"{t} {instruction}".strip() if instruction else t

    meta = {k: v for k, v in row.items() if k in ("level", "type", "subject", "id")}
    if fmt == "verl":
        return PromptRecord(row["prompt"], str(row["reward_model"]["ground_truth"]),
                            row.get("data_source") or "math", meta, index)
    if fmt == "deepscaler":
        return PromptRecord(text(row["problem"]), str(row["answer"]),
                            row.get("data_source") or "math", meta, index)
    if fmt == "math":
        answer = last_boxed(row["solution"])
        if answer is None:
            raise UserError(f"MATH record {index} has no \\boxed answer in its solution")
        return PromptRecord(text(row["problem"]), answer, row.get("data_source") or "math",
                            meta, index)
    return PromptRecord(text(row["prompt"]), str(row["answer"]),
                        row.get("data_source") or "math", meta, index)


def load_prompt_records(files: list[str], format: str = "auto",
                        instruction: str = "") -> list[PromptRecord]:
    if format not in FORMATS:
        raise UserError(f"data format {format!r}: use one of {', '.join(FORMATS)}")
    records = []
    for name in files:
        path = Path(name)
        if not path.exists():
            raise UserError(f"prompt file {path} does not exist: fix data.train_files / "
                            "data.eval_files")
        rows = _read_rows(path)
        if not rows:
            raise UserError(f"prompt file {path} holds no records")
        fmt = detect_format(rows[0]) if format == "auto" else format
        records += [_record(r, fmt, instruction, len(records) + i) for i, r in enumerate(rows)]
    return records


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt (text or chat messages) under the tokenizer's chat template,
    ending with the generation prompt (where the response starts)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def filter_by_length(records: list[PromptRecord], tokenizer, max_tokens: int,
                     report=print) -> list[PromptRecord]:
    """Drop prompts longer than ``max_tokens`` under the chat template; report the count."""
    kept = [r for r in records if len(chat_prompt_ids(tokenizer, r.prompt)) <= max_tokens]
    if not kept:
        raise UserError(f"every prompt is longer than rollout.max_prompt_length={max_tokens} "
                        "tokens: raise it")
    if len(kept) < len(records) and report is not None:
        report(f"filtered {len(records) - len(kept)} of {len(records)} prompts longer than "
               f"{max_tokens} tokens")
    return kept


class PromptIterator:
    """Batches of records in a seeded order, epoch after epoch; ``state_dict`` is the exact
    position, so a resumed run draws the same prompts the uninterrupted run would."""

    def __init__(self, records: list[PromptRecord], seed: int = 0, shuffle: bool = True):
        if not records:
            raise UserError("no prompts to train on")
        self.records, self.seed, self.shuffle = records, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[PromptRecord]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            take = min(n - len(out), len(self._order) - self.position)
            out += [self.records[i] for i in self._order[self.position:self.position + take]]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "size": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.records) or state["seed"] != self.seed:
            raise UserError("the checkpoint's prompt data differs from the config's (size or "
                            "seed changed): resume with the same data and trainer.seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()
