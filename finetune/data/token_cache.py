"""The tokenised-data cache: a dataset tokenized once is read back by every later run that would tokenize it the same.

The key is a hash of everything the rows depend on: the data file's bytes and the dataset's settings, the
tokenizer (its vocabulary, merges, added tokens and special tokens), the chat template, the end-of-turn token,
the sequence length and loss mask, the data layer's policy and the files it reads (topic list, name list,
evaluation sets), and the Wenmai version. Anything else changed is a different key, so a stale entry is never
read; an entry holds the rows and the data layer's report and register, so the stage's data card is the same
on a hit. Review-store datasets are never cached (the store changes under the same settings).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.data.layer import DatasetReport, RegisterEntry
from finetune.recipe import Recipe
from finetune.run_dir import atomic_write_text, sha256_file

CACHE_FORMAT = 2  # bump when the entry layout, the key or the way rows are built changes (2: keyed on whether
# data.augment covers the dataset; entries of 1 could hold an augmented dataset's rows without its copies)


@dataclass
class CachedSet:
    """A cache entry: the rows and what the data layer reported while making them."""

    rows: list[dict[str, list[int]]]
    stats: dict[str, Any]
    report: DatasetReport | None
    register: list[RegisterEntry]


def cache_key(
    recipe: Recipe, name: str, tokenizer: Any, seq_len: int, assistant_only: bool, augmented: bool = False
) -> str | None:
    """The entry's key for dataset `name` tokenized this way; None when the dataset cannot be cached.

    `augmented`: data.augment adds counterfactual copies to this dataset (two datasets on the same file, one of
    them augmented, are two entries)."""
    section = recipe.data[name]
    if section.format == "review" or section.path is None or not Path(section.path).is_file():
        return None
    parts = {
        "format": CACHE_FORMAT,
        "wenmai": __version__,
        "data_sha256": sha256_file(Path(section.path)),
        "dataset": section.model_dump(mode="json", exclude={"path"}),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "end_of_turn": recipe.model.end_of_turn,
        "seq_len": seq_len,
        "assistant_only": assistant_only,
        "policy": recipe.data.policy.model_dump(mode="json"),
        "augment": recipe.data.augment.model_dump(mode="json") if augmented and recipe.data.augment else None,
        "policy_files": {key: _path_sha256(Path(path)) for key, path in recipe.data.policy_files()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of how the tokenizer turns text into ids: its whole definition and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({"special": tokenizer.all_special_tokens, "class": type(tokenizer).__name__})
    return hashlib.sha256((definition + specials).encode()).hexdigest()


def load(cache_dir: Path, key: str) -> CachedSet | None:
    """The entry for `key`, or None (absent, or unreadable: it is rebuilt)."""
    path = Path(cache_dir).expanduser() / f"{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        report = DatasetReport.model_validate(entry["report"]) if entry["report"] else None
        register = [RegisterEntry.model_validate(e) for e in entry["register"]]
        return CachedSet(entry["rows"], entry["stats"], report, register)
    except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        return None


def save(cache_dir: Path, key: str, entry: CachedSet) -> Path:
    """Write the entry atomically (a run killed while writing leaves no entry)."""
    folder = Path(cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "rows": entry.rows,
        "stats": entry.stats,
        "report": entry.report.model_dump(mode="json") if entry.report else None,
        "register": [e.model_dump(mode="json") for e in entry.register],
    }
    path = folder / f"{key}.json"
    atomic_write_text(path, json.dumps(body, ensure_ascii=False, separators=(",", ":")))
    return path


def _path_sha256(path: Path) -> str | None:
    """A file's hash, or a folder's (its files' names and hashes), or None when it is not there."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(path)), sha256_file(p)) for p in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None
