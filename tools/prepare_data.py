#!/usr/bin/env python
"""Turn public math RL datasets into the trainer's prompt files (JSONL).

    python tools/prepare_data.py deepscaler.json --format deepscaler --out deepscaler.jsonl
    python tools/prepare_data.py dapo-math-17k.parquet --format dapo --dedup --out dapo17k.jsonl
    python tools/prepare_data.py train.parquet --heldout 500 --heldout-out val.jsonl --out t.jsonl

Reads every layout ``megatron_sppo.data.prompts`` knows (verl parquet, DAPO-Math-17k,
DeepScaleR, MATH, plain; JSONL/JSON/Parquet/HF datasets on disk) and writes one record a line:
``{"prompt", "answer", "data_source"}`` for text prompts, verl's
``{"prompt": [messages], "reward_model": {"ground_truth"}, "data_source"}`` for chat prompts.
The instruction suffix is not baked in (the trainer's ``data.instruction`` adds it).
``--dedup`` drops repeated problems (DAPO-Math-17k's 17,917 rows hold 17,398 distinct ones);
``--heldout N`` moves N problems, chosen by ``--seed``, to a separate file.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.data.prompts import FORMATS, PromptRecord, load_prompt_records  # noqa: E402
from megatron_sppo.errors import UserError  # noqa: E402
from megatron_sppo.fileio import write_text_atomic  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert public math RL data to the trainer's JSONL.")
    p.add_argument("inputs", nargs="+", help="data files or HF datasets saved to disk")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--dedup", action="store_true", help="drop repeated problems (first kept)")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="move N problems to --heldout-out")
    p.add_argument("--heldout-out", help="JSONL for the held-out problems")
    p.add_argument("--seed", type=int, default=0, help="which problems are held out")
    return p


def _key(record: PromptRecord) -> str:
    return json.dumps(record.prompt, sort_keys=True) if isinstance(record.prompt, list) \
        else " ".join(record.prompt.split())


def to_row(record: PromptRecord) -> dict:
    if isinstance(record.prompt, list):
        return {"prompt": record.prompt, "reward_model": {"ground_truth": record.ground_truth},
                "data_source": record.data_source}
    return {"prompt": record.prompt, "answer": record.ground_truth,
            "data_source": record.data_source}


def _write(records: list[PromptRecord], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(to_row(r), ensure_ascii=False) + "\n"
                                    for r in records))


def prepare(args: argparse.Namespace) -> None:
    if args.heldout and not args.heldout_out:
        raise UserError("--heldout N needs --heldout-out FILE for the held-out problems")
    records = load_prompt_records(args.inputs, format=args.format, instruction="")
    total = len(records)
    if args.dedup:
        seen, unique = set(), []
        for r in records:
            if _key(r) not in seen:
                seen.add(_key(r))
                unique.append(r)
        records = unique
    if args.heldout >= len(records):
        raise UserError(f"--heldout {args.heldout} leaves no training problems out of "
                        f"{len(records)}: hold out fewer")
    held = set(random.Random(args.seed).sample(range(len(records)), args.heldout))
    train = [r for i, r in enumerate(records) if i not in held]
    _write(train, args.out)
    if args.heldout:
        _write([records[i] for i in sorted(held)], args.heldout_out)
    print(f"read {total} records; {total - len(records)} duplicates dropped; wrote {len(train)} "
          f"to {args.out}" + (f" and {len(held)} to {args.heldout_out}" if held else ""))


if __name__ == "__main__":
    sys.exit(run_tool(prepare, build_parser().parse_args()))
