"""Record formats and reading data files record by record, with file:line for every problem."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.data.preference import PREFERENCE_MODELS, check_record_set
from finetune.errors import DataError

MAX_LISTED_PROBLEMS = 20


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., min_length=1)


class ChatRecord(BaseModel):
    """`messages`: an optional system turn, then user/assistant turns, with at least one assistant turn."""

    model_config = ConfigDict(extra="allow")  # metadata (id, source, licence, ...) rides along
    messages: list[Message] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _turns(self) -> ChatRecord:
        roles = [m.role for m in self.messages]
        if "assistant" not in roles:
            raise ValueError("no assistant turn: a training conversation needs at least one assistant message")
        if "system" in roles[1:]:
            raise ValueError(f"a system message may only come first (found at messages[{roles.index('system', 1)}])")
        return self


class InstructionRecord(BaseModel):
    """`instruction`, optional `input`, and `output` (the answer the model learns)."""

    model_config = ConfigDict(extra="allow")
    instruction: str = Field(..., min_length=1)
    input: str = ""
    output: str = Field(..., min_length=1)


class TextRecord(BaseModel):
    """`text`: plain text, all of it learned."""

    model_config = ConfigDict(extra="allow")
    text: str = Field(..., min_length=1)


RECORD_MODELS: dict[str, type[BaseModel]] = {
    "chat": ChatRecord,
    "instruction": InstructionRecord,
    "text": TextRecord,
    **PREFERENCE_MODELS,
}


@dataclass
class RecordSet:
    """Valid records of one file (as dicts, metadata kept) and the bad ones that were skipped."""

    records: list[dict]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)


def read_records(
    path: str | Path, fmt: str, on_bad: str = "fail", max_records: int | None = None, context: dict | None = None
) -> RecordSet:
    """Read and validate every record of a data file; raise `DataError` naming file:line on bad ones.

    `context` carries what records are checked against (the recipe's reward dimensions, a tier order).
    """
    bad: list[tuple[str, str]] = []
    records = [record for _, record in islice(iter_records(path, fmt, bad, context), max_records)]
    check_bad_records(path, fmt, bad, on_bad)
    if not records:
        raise DataError(f"{path}: no usable records (format {fmt!r}); check the file and the dataset's `format`")
    check_record_set(fmt, records, str(path))
    return RecordSet(records, bad)


def iter_records(
    path: str | Path, fmt: str, bad: list[tuple[str, str]], context: dict | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield (file:line, record) for each valid record, streaming; bad ones are appended to `bad`."""
    yield from validated_records(iter_raw(Path(path)), fmt, bad, context)


def validated_records(
    rows: Iterable[tuple[str, dict | Exception]], fmt: str, bad: list[tuple[str, str]], context: dict | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for each raw row that is a valid record of `fmt`; bad ones are appended to `bad`."""
    model = RECORD_MODELS[fmt]
    for where, raw in rows:
        if isinstance(raw, Exception):
            bad.append((where, str(raw)))
            continue
        try:
            record = model.model_validate(raw, context=context).model_dump(exclude_unset=False)
        except ValidationError as err:
            bad.append((where, _describe(err, raw)))
            continue
        yield where, record


def check_bad_records(path: str | Path, fmt: str, bad: list[tuple[str, str]], on_bad: str) -> None:
    """Raise `DataError` listing the bad records (file:line, reason) unless the dataset skips them."""
    if bad and on_bad == "fail":
        listed = "\n".join(f"  - {w}: {r}" for w, r in bad[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
        raise DataError(
            f"{len(bad)} bad record{'s' if len(bad) != 1 else ''} in {path} (format {fmt!r}):\n{listed}{more}\n"
            "Fix them, or set `on_bad_record: skip` on this dataset to drop them with a count."
        )


def iter_raw(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    """Yield (file:line or file:row, record dict or the reason it could not be read)."""
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}; check the dataset's `path` (relative paths are relative to the recipe)"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix in (".parquet", ".csv"):
        yield from _iter_table(path, suffix)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, ValueError(f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            yield where, value if isinstance(value, dict) else ValueError("a record must be a JSON object")


def _iter_json(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        yield f"{path}:{err.lineno}", ValueError(f"not valid JSON ({err.msg})")
        return
    if not isinstance(value, list):
        yield f"{path}:1", ValueError("a .json data file must hold a list of records (use .jsonl for one per line)")
        return
    for i, item in enumerate(value):
        yield f"{path}[{i}]", item if isinstance(item, dict) else ValueError("a record must be a JSON object")


def _iter_table(path: Path, suffix: str) -> Iterator[tuple[str, dict | Exception]]:
    from datasets import Dataset

    table = (
        Dataset.from_parquet(str(path)) if suffix == ".parquet" else Dataset.from_csv(str(path), keep_default_na=False)
    )
    for i, row in enumerate(table):
        yield f"{path}:row {i + 1}", row


def _describe(err: ValidationError, raw: Any) -> str:
    parts = []
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = f"missing field {loc!r}" + (f" (fields present: {', '.join(raw)})" if isinstance(raw, dict) else "")
            parts.append(msg)
        elif e["type"] == "literal_error":
            parts.append(f"{loc}: {msg} (got {e['input']!r})")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
