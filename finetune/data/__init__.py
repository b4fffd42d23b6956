"""The data path: every stage reads its records through `load_records` and tokenizes through here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data import token_cache
from finetune.data.augment import Swapper, augment_records
from finetune.data.card import write_stage_files
from finetune.data.chat import IGNORE_INDEX, to_messages, tokenize_chat, tokenize_text
from finetune.data.layer import LayerRecords, dataset_roles, load_dataset
from finetune.distributed.ranks import is_main_process
from finetune.errors import Problem
from finetune.recipe import Recipe
from finetune.recipe.augment import AUGMENT_FORMATS
from finetune.recipe.secrets import redact_data, secrets_of


def policy_file_problems(recipe: Recipe) -> list[Problem]:
    """A problem at `data.policy.<key>` for each file the data policy names (topic list, name list, evaluation
    sets to check against) that is not there; `wenmai validate` and `wenmai data` report them with the recipe's."""
    return [
        Problem(f"data.policy.{key}", f"{path} not found")
        for key, path in recipe.data.policy_files()
        if not Path(path).exists()
    ]


def load_records(recipe: Recipe, name: str, stage_dir: Path | None = None) -> LayerRecords:
    """The records of dataset `name` that may train, after the data policy, PII scrubbing and dedup.

    Bad records fail or are skipped (the dataset's `on_bad_record`); a dataset `data.augment` covers gets its
    counterfactual copies (`finetune.data.augment`). Given a stage folder, the stage's
    data card and sensitive-topic register are written there (by rank 0 alone under `wenmai launch`).
    """
    records = load_dataset(recipe, name)
    if name in augmented_datasets(recipe):
        copies, swaps = augment_records(
            records.records, recipe.data[name].record_format, Swapper.from_section(recipe.data.augment)
        )
        records.records += copies
        if records.report is not None:
            records.report.augmented, records.report.augmented_swaps = len(copies), swaps
    if stage_dir is not None and is_main_process():
        _write_stage_files(recipe, Path(stage_dir), records.report, records.register)
    return records


def _write_stage_files(recipe: Recipe, stage_dir: Path, report, register) -> None:
    """The stage's data card and register; a data path given as ${env:...} is written as the reference."""
    secrets = secrets_of(recipe)
    report = type(report).model_validate(redact_data(report.model_dump(), secrets))
    register = [type(e).model_validate(redact_data(e.model_dump(), secrets)) for e in register]
    write_stage_files(stage_dir, report, register, recipe.data.policy)


def augmented_datasets(recipe: Recipe) -> list[str]:
    """The datasets `data.augment` copies: those it names, else every chat/instruction/text set a stage trains on."""
    section = recipe.data.augment
    if section is None:
        return []
    if section.datasets is not None:
        return list(section.datasets)
    roles = dataset_roles(recipe)
    return [
        n
        for n, r in roles.items()
        if "train" in r and n in recipe.data and recipe.data[n].record_format in AUGMENT_FORMATS
    ]


@dataclass
class TokenizedSet:
    """Rows of input_ids/labels ready for a trainer, and what happened on the way."""

    rows: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)


def tokenize_records(
    recipe: Recipe,
    name: str,
    tokenizer: Any,
    seq_len: int,
    assistant_only: bool = True,
    stage_dir: Path | None = None,
    cache_dir: str | Path | None = None,
    *,
    extra: Callable[[dict], dict] | None = None,
) -> TokenizedSet:
    """Render and tokenize a dataset for language-model training, truncated to `seq_len`; `extra(record)` adds
    fields to the record's row (the `debias` stage's protected attribute).

    With `cache_dir` (and no `extra`), rows tokenized before with the same data, tokenizer, template and data
    policy are read back from there (`finetune.data.token_cache`); `stats["token_cache"]` says hit or miss.
    """
    if extra is not None:
        cache_dir = None  # rows with fields of the stage's own are not what the cache keys
    key = (
        token_cache.cache_key(recipe, name, tokenizer, seq_len, assistant_only, name in augmented_datasets(recipe))
        if cache_dir
        else None
    )
    cached = token_cache.load(Path(cache_dir), key) if cache_dir and key else None
    if cached is not None:
        if stage_dir is not None and is_main_process() and cached.report is not None:
            # the entry was filled from a file with these bytes, maybe at another path: name this one
            here = {cached.report.path: str(recipe.data[name].path)} if cached.report.path else {}
            report = type(cached.report).model_validate(redact_data(cached.report.model_dump(), here))
            report.name = name  # and under this run's name for it
            register = [type(e).model_validate(redact_data(e.model_dump(), here)) for e in cached.register]
            _write_stage_files(recipe, Path(stage_dir), report, register)
        return TokenizedSet(cached.rows, {**cached.stats, "token_cache": "hit"})
    tokenized, records = _tokenize(recipe, name, tokenizer, seq_len, assistant_only, stage_dir, extra)
    if cache_dir and key:
        entry = token_cache.CachedSet(tokenized.rows, tokenized.stats, records.report, records.register)
        try:
            token_cache.save(Path(cache_dir), key, entry)
        except OSError as err:  # the cache only saves time: a folder it cannot write never stops training
            print(f"token_cache: not saved ({err}); training goes on without it", file=sys.stderr)
    tokenized.stats["token_cache"] = "miss" if cache_dir and key else "off"
    return tokenized


def _tokenize(
    recipe: Recipe,
    name: str,
    tokenizer: Any,
    seq_len: int,
    assistant_only: bool,
    stage_dir: Path | None,
    extra: Callable[[dict], dict] | None,
) -> tuple[TokenizedSet, LayerRecords]:
    from rich.progress import track

    records = load_records(recipe, name, stage_dir)
    section = recipe.data[name]
    rows, truncated, dropped, tokens, learned = [], 0, 0, 0, 0
    for record in track(records.records, description=f"tokenizing {name}", transient=True):
        if section.record_format == "text":
            row = tokenize_text(tokenizer, record["text"])
        else:
            messages = to_messages(record, section.record_format, section.system_prompt)
            row = tokenize_chat(tokenizer, messages, assistant_only, recipe.model.end_of_turn)
        if len(row["input_ids"]) > seq_len:
            truncated += 1
            row = {k: v[:seq_len] for k, v in row.items()}
        n_learned = sum(1 for label in row["labels"] if label != IGNORE_INDEX)
        if n_learned == 0:
            dropped += 1  # truncation cut every assistant token: nothing to learn from this record
            continue
        tokens += len(row["input_ids"])
        learned += n_learned
        rows.append({**row, **extra(record)} if extra else row)
    report = records.report
    stats = {
        "records": len(records.records),
        "skipped_bad_records": len(records.skipped),
        "augmented": report.augmented if report else 0,
        "excluded_by_policy": sum(report.excluded.values()) if report else 0,
        "duplicates_removed": sum(report.duplicates.values()) if report else 0,
        "pii_masked": sum(report.pii_found.values()) if report and report.pii_action == "mask" else 0,
        "truncated": truncated,
        "dropped_no_learned_tokens": dropped,
        "sequences": len(rows),
        "tokens": tokens,
        "learned_tokens": learned,
    }
    return TokenizedSet(rows, stats), records
