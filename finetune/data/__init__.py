"""The data path: every stage reads its records through `load_records` and tokenizes through here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.data.chat import IGNORE_INDEX, to_messages, tokenize_chat, tokenize_text
from finetune.data.records import RecordSet, read_records
from finetune.recipe import Recipe, reward_dimensions


def load_records(recipe: Recipe, name: str) -> RecordSet:
    """The valid records of the recipe's dataset `name` (bad ones fail or are skipped, by its policy)."""
    section = recipe.data[name]
    context = {"dimensions": [d.name for d in reward_dimensions(recipe)], "tier_order": section.tier_order}
    return read_records(section.path, section.format, section.on_bad_record, section.max_records, context)


@dataclass
class TokenizedSet:
    """Rows of input_ids/labels ready for a trainer, and what happened on the way."""

    rows: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)


def tokenize_records(recipe: Recipe, name: str, tokenizer: Any, seq_len: int, assistant_only: bool = True) -> TokenizedSet:
    """Render and tokenize a dataset for language-model training, truncated to `seq_len`."""
    from rich.progress import track

    records = load_records(recipe, name)
    section = recipe.data[name]
    rows, truncated, dropped, tokens, learned = [], 0, 0, 0, 0
    for record in track(records.records, description=f"tokenizing {name}", transient=True):
        if section.format == "text":
            row = tokenize_text(tokenizer, record["text"])
        else:
            messages = to_messages(record, section.format, section.system_prompt)
            row = tokenize_chat(tokenizer, messages, assistant_only=assistant_only)
        if len(row["input_ids"]) > seq_len:
            truncated += 1
            row = {k: v[:seq_len] for k, v in row.items()}
        n_learned = sum(1 for label in row["labels"] if label != IGNORE_INDEX)
        if n_learned == 0:
            dropped += 1  # truncation cut every assistant token: nothing to learn from this record
            continue
        tokens += len(row["input_ids"])
        learned += n_learned
        rows.append(row)
    stats = {
        "records": len(records.records),
        "skipped_bad_records": len(records.skipped),
        "truncated": truncated,
        "dropped_no_learned_tokens": dropped,
        "sequences": len(rows),
        "tokens": tokens,
        "learned_tokens": learned,
    }
    return TokenizedSet(rows, stats)
