"""Record formats and reading data files record by record, with file:line for every problem."""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.data.preference import PREFERENCE_MODELS, check_record_set
from finetune.errors import DataError

MAX_LISTED_PROBLEMS = 20
CSV_FIELD_LIMIT = 2**31 - 1  # a whole document in one cell is a record, not an error (the csv default is 128 KiB)
TOO_DEEP = (
    "nested too deeply (about a thousand lists or objects inside each other); a record holds text, not deep structures"
)
_SURROGATE = re.compile("[\ud800-\udfff]")  # no character: a byte surrogateescape kept, or a stray \\udXXX escape
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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
        blank = [i for i, m in enumerate(self.messages) if m.role == "assistant" and not m.content.strip()]
        if blank:
            raise ValueError(f"messages[{blank[0]}]: the assistant reply is only whitespace; there is nothing to learn")
        return self


class InstructionRecord(BaseModel):
    """`instruction`, optional `input`, and `output` (the answer the model learns)."""

    model_config = ConfigDict(extra="allow")
    instruction: str = Field(..., min_length=1)
    input: str = ""
    output: str = Field(..., min_length=1)

    @field_validator("output")
    @classmethod
    def _output_has_text(cls, value: str) -> str:
        return _has_text(value)


class TextRecord(BaseModel):
    """`text`: plain text, all of it learned."""

    model_config = ConfigDict(extra="allow")
    text: str = Field(..., min_length=1)

    @field_validator("text")
    @classmethod
    def _text_has_text(cls, value: str) -> str:
        return _has_text(value)


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
    """Yield (file:line or file:row, record dict or the reason it could not be read).

    A problem with one record is yielded in its place; a file that cannot be read at all (UTF-16, a broken
    Parquet file, a .json document that does not parse) raises `DataError` naming the file and what to do.
    """
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}; check the dataset's `path` (relative paths are relative to the recipe)"
        )
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _iter_jsonl,
        ".ndjson": _iter_jsonl,
        ".json": _iter_json,
        ".csv": _iter_csv,
        ".parquet": _iter_parquet,
    }
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
    try:
        if suffix != ".parquet":  # the text formats
            _refuse_utf16(path)
        yield from readers[suffix](path)
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err}); check that it is readable") from None


def _refuse_utf16(path: Path) -> None:
    """UTF-16 read as UTF-8 is noise on every line: say so once (a BOM, or NUL bytes in the first line)."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    first_line = next((line for line in head.split(b"\n") if line.strip()), b"")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in first_line:
        raise DataError(
            f"{path}: the file is UTF-16; save it as UTF-8 (in most editors: Save As, encoding UTF-8) and read it again"
        )


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    # bytes, decoded line by line: a stray non-UTF-8 byte is that line's problem, not the whole file's
    with path.open("rb") as f:
        for number, line in enumerate(_byte_lines(f), start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(line[: err.start].decode("utf-8")) + 1
                yield where, ValueError(_not_utf8(line[err.start], f" at column {column}"))
                continue
            yield where, _parse_record(text)


def _byte_lines(f: Any) -> Iterator[bytes]:
    for chunk in f:
        yield from chunk.splitlines()  # a lone \r ends a line too, as when reading text


def _parse_record(text: str) -> dict | Exception:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return ValueError(f"not valid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return ValueError(f"not readable: JSON {TOO_DEEP}")
    except ValueError as err:  # e.g. an integer of more than 4,300 digits
        return ValueError(f"not readable JSON ({_first_clause(err)})")
    if not isinstance(value, dict):
        return ValueError("a record must be a JSON object")
    char = _surrogate(value) if _SURROGATE_ESCAPE.search(text) else None
    return value if char is None else ValueError(_not_a_character(char))


def _iter_json(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    # one document: what keeps it from parsing stops the whole file; a non-UTF-8 byte is kept (surrogateescape)
    # and makes only the record holding it bad
    text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")
    suspect = bool(_SURROGATE.search(text) or _SURROGATE_ESCAPE.search(text))
    advice = "the whole file is one JSON document, so nothing in it can be read; fix it, or use .jsonl"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); {advice}") from None
    except RecursionError:
        raise DataError(f"{path}: not readable: JSON {TOO_DEEP}; {advice}") from None
    except ValueError as err:
        raise DataError(f"{path}: not readable JSON ({_first_clause(err)}); {advice}") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json data file must hold a list of records (use .jsonl for one per line)")
    for i, item in enumerate(value):
        char = _surrogate(item) if suspect else None
        if char is not None:
            yield f"{path}[{i}]", ValueError(_undecoded(char))
        else:
            yield f"{path}[{i}]", item if isinstance(item, dict) else ValueError("a record must be a JSON object")


def _iter_csv(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    # the csv module, not pandas: every value stays a string (empty ones too), a ragged row is that row's
    # problem, and nothing is written to a cache
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            yield from _csv_rows(path, csv.reader(f, strict=True))
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, reader: Any) -> Iterator[tuple[str, dict | Exception]]:
    header, number = None, 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if "end of data" in str(err):
                raise DataError(
                    f"{path}:{start}: a quoted value that starts on this line is never closed, so the rest of the file "
                    'would be one value; close the quote (a quote inside a quoted value is written twice: "")'
                ) from None
            if header is None:
                raise DataError(f"{path}:{start}: the header is not valid CSV ({err})") from None
            number += 1
            yield f"{path}:row {number}", ValueError(f'not valid CSV ({err}); a quote inside a quoted value is ""')
            continue
        if not row:
            continue  # a blank line
        if header is None:
            header = _csv_header(path, start, row)
            continue
        number += 1
        where = f"{path}:row {number}"
        problem = _csv_row_problem(header, row)
        yield where, ValueError(problem) if problem else dict(zip(header, row, strict=True))


def _csv_row_problem(header: list[str], row: list[str]) -> str | None:
    for name, value in zip(header, row, strict=False):
        char = _surrogate(value)
        if char is not None:
            return _undecoded(char, f" in column {name!r}")
    if len(row) != len(header):
        return (
            f"{len(row)} field{'s' if len(row) != 1 else ''} but the header has {len(header)} ({', '.join(header)}); "
            "quote values that hold a comma, and give every column a value (it may be empty)"
        )
    return None


def _csv_header(path: Path, line: int, header: list[str]) -> list[str]:
    char = _surrogate(header)
    if char is not None:
        raise DataError(f"{path}:{line}: the header is {_undecoded(char)}")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"{path}:{line}: the header names column(s) {', '.join(map(repr, twice))} more than once")
    return header


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        with pq.ParquetFile(path) as table:
            for batch in table.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    number += 1
                    yield f"{path}:row {number}", row
    except (pa.ArrowException, OSError) as err:
        at = f" after row {number}" if number else ""
        raise DataError(
            f"{path}: not a readable Parquet file{at} ({err}); it may be truncated or not Parquet at all: "
            "write it again (pandas: df.to_parquet, datasets: ds.to_parquet) or convert it to .jsonl"
        ) from None


def _first_clause(err: Exception) -> str:
    return str(err).split(";")[0]  # Python's advice after the `;` is for programmers, not for the data's author


def _not_utf8(byte: int, place: str = "") -> str:
    return f"not UTF-8 (byte 0x{byte:02x}{place}); save the file as UTF-8"


def _undecoded(char: str, place: str = "") -> str:
    """What a surrogate in text decoded with surrogateescape stands for: a byte that is not UTF-8, or an escape."""
    if "\udc80" <= char <= "\udcff":
        return _not_utf8(ord(char) - 0xDC00, place)
    return _not_a_character(char, place)


def _not_a_character(char: str, place: str = "") -> str:
    return f"holds \\u{ord(char):04x}{place}: half of a surrogate pair, not a character; write the character itself"


def _surrogate(value: Any) -> str | None:
    """The first surrogate in any string of a decoded value (walked without recursion: the value may be deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return None


def _has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("only whitespace; there is nothing to learn")
    return value


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
