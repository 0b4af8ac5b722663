"""Prompt data for RL: records from JSONL, JSON, Parquet or a folder written by HF
``datasets.save_to_disk``, in the common RL layouts, and a deterministic, resumable iterator.

Layouts (``format``; ``auto`` detects it from the first record):

- ``verl``: ``prompt`` is a chat-messages list, ``reward_model.ground_truth``, ``data_source``
  (verl's parquet); prompts are used as given. DAPO-Math-17k ships in it with
  ``data_source: math_dapo``, both as published (a prompt asking for an "Answer:" line) and
  as the SPPO authors train on it (``dapo-math-17k_dedup.parquet``: the same problems asking
  for ``\\boxed{}``); the reward registry checks what each prompt asks for.
- ``dapo``: DAPO-Math-17k rewritten for a boxed answer, from either form: the bare problem
  is cut out of the prompt, cleaned up as the SPPO authors did (``transformer_dapo_prmopt.py``:
  blank lines become spaces) and gets the configured instruction (theirs is
  :data:`DAPO_INSTRUCTION`); ``data_source`` becomes ``math``.
- ``deepscaler``: ``{problem, answer}``.
- ``math``: ``{problem, solution}``; the ground truth is the last boxed answer of the solution.
- ``plain``: ``{prompt, answer}``.

Text prompts get the instruction suffix appended (default: the R1 evaluation instruction).
HF ``datasets`` need not be installed: a saved dataset is Arrow IPC files that pyarrow reads.
A ground truth with an unclosed brace (Minerva-Math's ``\\frac{dM``) is reported when loaded:
no answer can match it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sppo.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FORMATS = ("auto", "verl", "dapo", "deepscaler", "math", "plain")
LAYOUTS = {
    "verl": "{prompt: [chat messages], reward_model: {ground_truth}, data_source}",
    "dapo": "DAPO-Math-17k: {prompt: [chat messages], reward_model: {ground_truth}}",
    "deepscaler": "{problem, answer}",
    "math": "{problem, solution with a \\boxed{} answer}",
    "plain": "{prompt, answer}",
}
# DAPO-Math-17k wraps every problem in these two sentences (they ask for "Answer: ...").
DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the "
             "answer to the problem.")
DAPO_TAIL = 'Remember to put your answer on its own line after "Answer:".'
# The SPPO authors' replacement for DAPO_TAIL (their transformer_dapo_prmopt.py), also the
# instruction of every prompt in their evaluation files.
DAPO_INSTRUCTION = "Please output the final answer within \\boxed{}."
# What to do with a prompt longer than rollout.max_prompt_length (data.overlong_prompts):
# leave it out, or keep its last tokens (verl's data.truncation=left, the authors' 7B run).
OVERLONG = ("drop", "truncate_left")
# Row fields kept as metadata (difficulty, subject, ids) for metrics and user rewards.
METADATA_FIELDS = ("level", "type", "subject", "id", "unique_id", "extra_info", "ability")


@dataclass
class PromptRecord:
    """One prompt: ``prompt`` is a user-turn text or a chat-messages list; ``index`` is its
    position in the loaded data (before any filtering), for tracing a sample back."""

    prompt: str | list
    ground_truth: str
    data_source: str = "math"
    metadata: dict = field(default_factory=dict)
    index: int = 0


# ---- reading files -------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno}): "
                                "fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: a JSON {type(row).__name__}, not an object: "
                                "each line must be one record {...}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}): fix the file") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: expected a JSON list of records [{{...}}, ...]; for one "
                        "record a line use .jsonl")
    return rows


def _read_arrow(files: list[Path]) -> list[dict]:
    import pyarrow as pa

    rows = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # the random-access file format, for other writers
                table = pa.ipc.open_file(source).read_all()
        rows += table.to_pylist()
    return rows


def _read_saved_dataset(path: Path) -> list[dict]:
    """A ``datasets.save_to_disk`` folder: ``state.json`` lists its Arrow files in order."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise UserError(f"{path} holds several splits ({', '.join(splits)}): give one split's "
                        f"folder, e.g. {path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    if state.exists():
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise UserError(f"{path} is a folder without a datasets state.json or .arrow files: "
                        "give a JSONL/Parquet file or a folder written by datasets.save_to_disk")
    return _read_arrow(files)


def read_rows(path: str | Path) -> list[dict]:
    """The records of one file or saved-dataset folder, as dicts."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompt data {path} does not exist: check the path in the config")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".arrow":
        return _read_arrow([path])
    raise UserError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .parquet, .arrow "
                    "or a datasets.save_to_disk folder")


# ---- layouts -------------------------------------------------------------------------------

def _is_messages(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def detect_format(row: dict, where: str = "record") -> str:
    """The layout of ``row``, or a UserError listing what each layout needs."""
    if _is_messages(row.get("prompt")) and isinstance(row.get("reward_model"), dict):
        return "verl"
    if "problem" in row and "answer" in row:
        return "deepscaler"
    if "problem" in row and "solution" in row:
        return "math"
    if isinstance(row.get("prompt"), str) and "answer" in row:
        return "plain"
    expected = "; ".join(f"{name} {layout}" for name, layout in LAYOUTS.items())
    raise UserError(f"{where}: cannot tell the layout of a record with fields {sorted(row)}; "
                    f"expected one of: {expected}")


def answer_text(value) -> str:
    """A ground truth as text: integral floats lose their ``.0`` (``34.0`` -> ``34``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _field(row: dict, name: str, fmt: str, where: str):
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: field {name!r} is missing or empty; the {fmt} layout is "
                        f"{LAYOUTS[fmt]} (set data.format if the layout was misdetected)")
    return value


def _dapo_prompt(messages: list, instruction: str, where: str) -> str:
    """A DAPO-Math-17k prompt, as published or as the SPPO authors rewrote it, brought to
    their form (transformer_dapo_prmopt.py: blank lines become spaces, the "Answer:" sentences
    give way to :data:`DAPO_INSTRUCTION`) with ``instruction`` in place of theirs: with their
    instruction the text is theirs to the character; with none, the bare problem."""
    text = messages[-1]["content"]
    if text.lstrip().startswith(DAPO_HEAD) and text.rstrip().endswith(DAPO_TAIL):
        text = (text.replace("\n\n", " ").replace(DAPO_TAIL, DAPO_INSTRUCTION)
                .replace(DAPO_HEAD + " ", "")).rstrip()
    if not text.endswith(DAPO_INSTRUCTION):
        raise UserError(f"{where}: the prompt is neither DAPO-Math-17k's wrapper "
                        f"({DAPO_HEAD[:40]}...) nor ends with {DAPO_INSTRUCTION!r} as the "
                        "SPPO authors' copy does; use format verl for this data")
    body = text[:-len(DAPO_INSTRUCTION)]
    return body + instruction if instruction else body.strip()


def row_to_record(row: dict, fmt: str, *, instruction: str, index: int,
                  where: str = "record") -> PromptRecord:
    """One row in layout ``fmt`` as a :class:`PromptRecord`."""
    from megatron_sppo.rewards.math import last_boxed

    def ask(text: str) -> str:
        return f"{text.strip()} {instruction}" if instruction else text.strip()

    metadata = {k: row[k] for k in METADATA_FIELDS if row.get(k) is not None}
    source = row.get("data_source") or "math"
    if fmt in ("verl", "dapo"):
        messages = _field(row, "prompt", fmt, where)
        if not _is_messages(messages):
            raise UserError(f"{where}: field 'prompt' is not a list of chat messages "
                            "[{role, content}, ...] as the verl layout needs")
        reward_model = _field(row, "reward_model", fmt, where)
        truth = answer_text(_field(reward_model, "ground_truth", fmt, where))
        if fmt == "dapo":
            return PromptRecord(_dapo_prompt(messages, instruction, where), truth, "math",
                                {**metadata, "original_data_source": source}, index)
        return PromptRecord([dict(m) for m in messages], truth, source, metadata, index)
    if fmt == "deepscaler":
        return PromptRecord(ask(_field(row, "problem", fmt, where)),
                            answer_text(_field(row, "answer", fmt, where)), source, metadata,
                            index)
    if fmt == "math":
        truth = last_boxed(_field(row, "solution", fmt, where))
        if truth is None:
            raise UserError(f"{where}: the solution has no \\boxed{{}} answer to use as the "
                            "ground truth; add an 'answer' field or drop the record")
        return PromptRecord(ask(_field(row, "problem", fmt, where)), truth, source, metadata,
                            index)
    if fmt == "plain":
        return PromptRecord(ask(_field(row, "prompt", fmt, where)),
                            answer_text(_field(row, "answer", fmt, where)), source, metadata,
                            index)
    raise UserError(f"data format {fmt!r}: use one of {', '.join(FORMATS)}")


def load_prompt_records(files: list[str], format: str = "auto",
                        instruction: str = DEFAULT_INSTRUCTION) -> list[PromptRecord]:
    """Every record of ``files`` in order; ``index`` counts across files."""
    if format not in FORMATS:
        raise UserError(f"data format {format!r}: use one of {', '.join(FORMATS)}")
    if isinstance(files, (str, Path)):
        files = [files]
    records: list[PromptRecord] = []
    for name in files:
        rows = read_rows(name)
        if not rows:
            raise UserError(f"prompt data {name} holds no records: check the file")
        fmt = detect_format(rows[0], f"{name}: record 0") if format == "auto" else format
        start = len(records)
        for i, row in enumerate(rows):
            records.append(row_to_record(row, fmt, instruction=instruction,
                                         index=len(records), where=f"{name}: record {i}"))
        warn_truncated_ground_truths(records[start:], str(name))
    return records


def warn_truncated_ground_truths(records: list[PromptRecord], where: str) -> int:
    """How many ground truths have an unclosed brace (cut while the file was made: the
    SPPO authors' Minerva-Math holds 68 of 272, e.g. ``\\frac{dM``); warns when any do."""
    from megatron_sppo.rewards.math import unclosed_brace

    cut = [r.ground_truth for r in records if unclosed_brace(r.ground_truth)]
    if cut:
        log.warning("%s: %d of %d ground truths are cut at a brace (e.g. %s): no answer can "
                    "match them, so accuracy on this file cannot exceed %.1f%%", where,
                    len(cut), len(records), ", ".join(cut[:3]),
                    100 * (1 - len(cut) / len(records)))
    return len(cut)


# ---- chat template and length filter -------------------------------------------------------

def _messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def chat_text(tokenizer, prompt) -> str:
    """A prompt (text or chat messages) under the tokenizer's chat template, ending with the
    generation prompt (where the response starts)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the policy's tokenizer has no chat template: use a chat/instruct "
                        "checkpoint (its tokenizer_config.json sets chat_template)")
    return tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True,
                                         tokenize=False)


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of :func:`chat_text`. The template writes any BOS itself, so the tokenizer
    adds no special tokens."""
    return tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def chat_prompt_lengths(tokenizer, prompts: list) -> list[int]:
    """Token counts of many prompts, tokenised in one batch (fast tokenizers run the batch
    in parallel: 17k prompts take seconds, not minutes)."""
    texts = [chat_text(tokenizer, p) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def truncate_left(ids: list[int], max_tokens: int) -> list[int]:
    """The last ``max_tokens`` ids (verl's ``data.truncation=left``): the chat template's
    start goes first, the question's end and the generation prompt stay."""
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def filter_by_length(records: list[PromptRecord], tokenizer, max_tokens: int,
                     report=print, overlong: str = "drop") -> list[PromptRecord]:
    """Drop prompts longer than ``max_tokens`` under the chat template, or with
    ``overlong="truncate_left"`` keep them (they are cut to their last ``max_tokens``
    tokens when tokenized for a step); ``report`` gets one line with the count."""
    if overlong not in OVERLONG:
        raise UserError(f"data.overlong_prompts={overlong!r}: use one of {', '.join(OVERLONG)}")
    lengths = chat_prompt_lengths(tokenizer, [r.prompt for r in records])
    if overlong == "truncate_left":
        longer = sum(n > max_tokens for n in lengths)
        if longer and report is not None:
            report(f"{longer} of {len(records)} prompts are longer than {max_tokens} tokens: "
                   "they keep their last tokens")
        return records
    kept = [r for r, n in zip(records, lengths, strict=True) if n <= max_tokens]
    dropped = len(records) - len(kept)
    if not kept:
        raise UserError(f"all {len(records)} prompts are longer than {max_tokens} tokens "
                        f"(shortest {min(lengths, default=0)}): raise rollout.max_prompt_length")
    if dropped and report is not None:
        report(f"dropped {dropped} of {len(records)} prompts longer than {max_tokens} tokens; "
               f"{len(kept)} remain")
    return kept


# ---- iteration -----------------------------------------------------------------------------

def fingerprint(records: list[PromptRecord]) -> str:
    """A digest of the data (prompts, answers, order): a resumed run must see the same."""
    digest = hashlib.blake2b(digest_size=16)
    for r in records:
        digest.update(json.dumps([r.prompt, r.ground_truth, r.data_source],
                                 ensure_ascii=False).encode())
    return digest.hexdigest()


class PromptIterator:
    """Batches of records in a seeded order, epoch after epoch (each epoch a fresh seeded
    permutation; a batch may span two epochs). ``state_dict`` is the exact position, so a
    resumed run draws the same prompts the uninterrupted run would have drawn.

    Records drawn but not used (prompt selection skips them) go back with :meth:`give_back`:
    they are drawn again, in the order given back, after the current epoch's order and
    before the next epoch's (and after that one's, if given back again). Nothing drawn is
    lost or drawn twice; the queue is part of the state."""

    def __init__(self, records: list[PromptRecord], seed: int = 0, shuffle: bool = True):
        if not records:
            raise UserError("no prompts to iterate over: check the prompt files and filters")
        self.records, self.seed, self.shuffle = records, seed, shuffle
        self.epoch, self.position = 0, 0
        self.returned: list[int] = []
        self._fingerprint = fingerprint(records)
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def draw(self, n: int) -> list[int]:
        """Positions in :attr:`records` of the next ``n`` prompts."""
        out: list[int] = []
        while len(out) < n:
            if self.position == len(self._order):
                if self.returned:
                    take = min(n - len(out), len(self.returned))
                    out += self.returned[:take]
                    del self.returned[:take]
                    continue
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            take = min(n - len(out), len(self._order) - self.position)
            out += self._order[self.position:self.position + take]
            self.position += take
        return out

    def next_batch(self, n: int) -> list[PromptRecord]:
        return [self.records[i] for i in self.draw(n)]

    def give_back(self, positions: list[int]) -> None:
        """Return drawn, unused prompts (positions from :meth:`draw`) to the stream."""
        self.returned += positions

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "size": len(self.records),
                "fingerprint": self._fingerprint, "returned": list(self.returned)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "shuffle", "size", "fingerprint") if state.get(k) != mine[k]]
        if changed:
            raise UserError(f"the checkpoint's prompt data differs from this run's "
                            f"({', '.join(changed)} changed): resume with the same data files, "
                            "filters and trainer.seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self.returned = list(state.get("returned", []))
        self._order = self._epoch_order()
