"""The data path: record formats, file:line errors, chat rendering and the assistant-only loss mask."""

from __future__ import annotations

import json

import pytest
from tiny_models import write_jsonl

from finetune.data.chat import IGNORE_INDEX, end_of_turn_ids, to_messages, tokenize_chat, tokenize_text
from finetune.data.records import read_records
from finetune.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def learned_text(tokenizer, result) -> list[str]:
    """The learned tokens, decoded span by span (consecutive labelled tokens joined)."""
    spans, current = [], []
    for token, label in zip(result["input_ids"], result["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_mask_covers_exactly_the_assistant_turns_and_their_end_token(tokenizer):
    messages = [
        {"role": "system", "content": "你是博物馆讲解员。"},
        {"role": "user", "content": "《静夜思》的作者是谁？"},
        {"role": "assistant", "content": "李白，唐代诗人。"},
        {"role": "user", "content": "Which dynasty?"},
        {"role": "assistant", "content": "The Tang dynasty."},
    ]
    result = tokenize_chat(tokenizer, messages)
    assert learned_text(tokenizer, result) == ["李白，唐代诗人。<|im_end|>", "The Tang dynasty.<|im_end|>"]


def test_end_of_turn_token_is_learned_even_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap: padding masks would hide EOS
    result = tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    learned = [t for t, label in zip(result["input_ids"], result["labels"], strict=True) if label != IGNORE_INDEX]
    assert learned[-1] == tokenizer.eos_token_id
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id]


def test_loss_on_all_tokens_labels_everything(tokenizer):
    result = tokenize_chat(
        tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], assistant_only=False
    )
    assert result["labels"] == result["input_ids"]


def test_text_format_appends_eos(tokenizer):
    result = tokenize_text(tokenizer, "床前明月光")
    assert result["input_ids"][-1] == tokenizer.eos_token_id and result["labels"] == result["input_ids"]


def test_instruction_record_becomes_user_and_assistant_turns():
    messages = to_messages(
        {"instruction": "Translate", "input": "床前明月光", "output": "Moonlight"}, "instruction", "Be brief."
    )
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Translate\n\n床前明月光"


def test_template_without_end_token_is_refused(tokenizer):
    from copy import deepcopy

    bare = deepcopy(tokenizer)
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="never learn to stop"):
        end_of_turn_ids(bare)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path.write_text(f"{good}\n{{not json\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(path, "chat")
    assert f"{path}:2: not valid JSON" in str(info.value)
    assert "on_bad_record: skip" in str(info.value)


def test_chat_without_assistant_turn_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: no assistant turn"):
        read_records(path, "chat")


def test_invalid_role_and_missing_field_are_named(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"conversation": []},
        ],
    )
    with pytest.raises(DataError) as info:
        read_records(path, "chat")
    message = str(info.value)
    assert "d.jsonl:1: messages[0].role:" in message and "'bot'" in message
    assert "d.jsonl:2: missing field 'messages' (fields present: conversation)" in message


def test_skip_policy_drops_bad_records_and_counts_them(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": []}, good])
    records = read_records(path, "chat", on_bad="skip")
    assert len(records.records) == 2 and [w for w, _ in records.skipped] == [f"{path}:2"]


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nowhere.jsonl"):
        read_records(tmp_path / "nowhere.jsonl", "chat")


def test_metadata_fields_ride_along(tmp_path):
    row = {
        "id": "a1",
        "licence": "CC0-1.0",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    records = read_records(write_jsonl(tmp_path / "d.jsonl", [row]), "chat")
    assert records.records[0]["licence"] == "CC0-1.0" and records.records[0]["id"] == "a1"


def test_parquet_and_csv_are_read(tmp_path):
    from datasets import Dataset

    rows = [{"instruction": "Name the poet", "input": "静夜思", "output": "李白"}] * 3
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    assert read_records(tmp_path / "d.parquet", "instruction").records[0]["output"] == "李白"
    assert len(read_records(tmp_path / "d.csv", "instruction").records) == 3
