"""Prompt data: every loader on small files in the public layouts, format detection, bad input
(one line naming the problem), the chat template and length filter, resumable iteration."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sppo.data.prompts import (DAPO_HEAD, DAPO_TAIL, DEFAULT_INSTRUCTION,
                                        PromptIterator, PromptRecord, chat_prompt_ids,
                                        filter_by_length, load_prompt_records)
from megatron_sppo.errors import UserError
from megatron_sppo.models.tiny import build_char_tokenizer

VERL_ROWS = [
    {"data_source": "aime", "prompt": [{"role": "user", "content": "What is 2+2?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"},
     "extra_info": {"index": 0, "split": "train"}},
    {"data_source": "aime", "prompt": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is 3*3?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "9"},
     "extra_info": {"index": 1, "split": "train"}},
]
DAPO_ROW = {"data_source": "math_dapo", "ability": "MATH",
            "prompt": [{"role": "user", "content": f"{DAPO_HEAD}\n\nFind $x$ if $x+1=3$.\n\n"
                        f"{DAPO_TAIL}"}],
            "reward_model": {"ground_truth": "2", "style": "rule-lang"},
            "extra_info": {"index": "9a3c"}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_verl_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), path)
    records = load_prompt_records([str(path)])
    assert [r.ground_truth for r in records] == ["4", "9"]
    assert records[1].prompt == VERL_ROWS[1]["prompt"]  # messages used as given
    assert records[0].data_source == "aime" and records[1].index == 1
    assert records[0].metadata["extra_info"] == {"index": 0, "split": "train"}


def test_dapo_math_17k_as_given_and_rewritten_for_boxed(tmp_path):
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([DAPO_ROW]), path)
    (given,) = load_prompt_records([path])
    assert given.data_source == "math_dapo" and given.prompt[0]["content"].startswith(DAPO_HEAD)
    (boxed,) = load_prompt_records([path], format="dapo")
    assert boxed.prompt == f"Find $x$ if $x+1=3$. {DEFAULT_INSTRUCTION}"
    assert (boxed.ground_truth, boxed.data_source) == ("2", "math")
    assert boxed.metadata["original_data_source"] == "math_dapo"
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS[:1]), other)
    with pytest.raises(UserError, match="neither DAPO-Math-17k's wrapper"):
        load_prompt_records([other], format="dapo")


def test_deepscaler_math_and_plain(tmp_path):
    deepscaler = write_jsonl(tmp_path / "ds.jsonl", [
        {"problem": "Compute 1+1.", "answer": "2", "solution": "1+1=2"},
        {"problem": "Compute 10/4.", "answer": 2.5}])
    math = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Simplify.", "solution": r"So we get $\boxed{\frac{1}{2}}$.",
         "level": "Level 2", "type": "Algebra"}])
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"prompt": "Say 7.", "answer": 7}]))
    records = load_prompt_records([str(deepscaler), str(math), str(plain)], instruction="Box it.")
    assert [r.prompt for r in records] == ["Compute 1+1. Box it.", "Compute 10/4. Box it.",
                                           "Simplify. Box it.", "Say 7. Box it."]
    assert [r.ground_truth for r in records] == ["2", "2.5", r"\frac{1}{2}", "7"]
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert records[2].metadata == {"level": "Level 2", "type": "Algebra"}
    assert load_prompt_records([str(plain)], instruction="")[0].prompt == "Say 7."


def _save_to_disk(folder, rows):
    """What datasets.Dataset.save_to_disk writes: Arrow IPC stream files + state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names = []
    for i, part in enumerate((table.slice(0, 1), table.slice(1))):
        names.append(f"data-0000{i}-of-00002.arrow")
        with pa.OSFile(str(folder / names[-1]), "wb") as sink:
            with pa.ipc.new_stream(sink, part.schema) as writer:
                writer.write_table(part)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_hf_datasets_saved_to_disk(tmp_path):
    _save_to_disk(tmp_path / "ds" / "train", [{"problem": "A?", "answer": "1"},
                                              {"problem": "B?", "answer": "2"},
                                              {"problem": "C?", "answer": "3"}])
    records = load_prompt_records([tmp_path / "ds" / "train"], instruction="")
    assert [(r.prompt, r.ground_truth) for r in records] == [("A?", "1"), ("B?", "2"),
                                                             ("C?", "3")]
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(UserError, match="several splits.*ds/train"):
        load_prompt_records([tmp_path / "ds"])


@pytest.mark.parametrize("name,content,fmt,match", [
    ("missing.jsonl", None, "auto", "does not exist"),
    ("data.csv", "a,b\n", "auto", "unknown file type '.csv'"),
    ("bad.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": oops}\n', "auto",
     r"bad.jsonl:2: invalid JSON"),
    ("empty.jsonl", "\n", "auto", "holds no records"),
    ("odd.jsonl", '{"question": "a", "response": "b"}\n', "auto",
     r"fields \['question', 'response'\].*verl.*\{problem, answer\}"),
    ("gap.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": ""}\n', "auto",
     r"record 1: field 'answer' is missing or empty; the deepscaler layout is"),
    ("nobox.jsonl", '{"problem": "a", "solution": "it is 3"}\n', "auto", r"no \\boxed"),
    ("forced.jsonl", '{"problem": "a", "answer": "1"}\n', "verl", "field 'prompt' is missing"),
    ("x.jsonl", '{"problem": "a", "answer": "1"}\n', "alpaca", "data format 'alpaca'"),
])
def test_bad_input_names_problem_and_fix(tmp_path, name, content, fmt, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match) as err:
        load_prompt_records([str(path)], format=fmt)
    assert "\n" not in str(err.value)


def test_chat_template_and_length_filter():
    tok = build_char_tokenizer()
    ids = chat_prompt_ids(tok, "2+2?")
    assert tok.decode(ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.decode(chat_prompt_ids(tok, messages)).startswith("<|im_start|>system\nS")

    records = [PromptRecord("x" * n, "1", index=i) for i, n in enumerate((5, 50, 10, 80))]
    limit = len(chat_prompt_ids(tok, "x" * 10))  # the template adds the same tokens to each
    reports = []
    kept = filter_by_length(records, tok, limit, report=reports.append)
    assert [r.index for r in kept] == [0, 2]
    assert reports == [f"dropped 2 of 4 prompts longer than {limit} tokens; 2 remain"]
    with pytest.raises(UserError, match=r"all 4 prompts are longer than 3 tokens \(shortest"):
        filter_by_length(records, tok, 3)
    tok.chat_template = None  # a base model's tokenizer
    with pytest.raises(UserError, match="no chat template"):
        chat_prompt_ids(tok, "2+2?")


def _records(n):
    return [PromptRecord(f"p{i}", str(i), index=i) for i in range(n)]


def test_iterator_epochs_cover_everything_in_a_seeded_order():
    it = PromptIterator(_records(10), seed=3)
    first = [r.index for r in it.next_batch(10)]
    second = [r.index for r in it.next_batch(10)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and first != list(range(10))
    assert it.epoch == 1
    assert [r.index for r in PromptIterator(_records(10), seed=3).next_batch(10)] == first
    assert [r.index for r in PromptIterator(_records(10), seed=4).next_batch(10)] != first
    assert [r.index for r in PromptIterator(_records(4), shuffle=False).next_batch(6)] == \
        [0, 1, 2, 3, 0, 1]


def test_iterator_resume_continues_at_the_same_position():
    whole = PromptIterator(_records(10), seed=7)
    expected = [[r.index for r in whole.next_batch(7)] for _ in range(5)]

    first = PromptIterator(_records(10), seed=7)
    got = [[r.index for r in first.next_batch(7)] for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptIterator(_records(10), seed=7)
    resumed.load_state_dict(state)
    got += [[r.index for r in resumed.next_batch(7)] for _ in range(3)]
    assert got == expected

    changed = _records(10)
    changed[3] = PromptRecord("other", "3", index=3)
    for records, seed in ((changed, 7), (_records(10), 8), (_records(11), 7)):
        with pytest.raises(UserError, match="differs from this run's"):
            PromptIterator(records, seed=seed).load_state_dict(state)


def test_iterator_needs_records():
    with pytest.raises(UserError, match="no prompts"):
        PromptIterator([])
