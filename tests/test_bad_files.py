"""Data files that used to end in a traceback: a bad record is named by file:line (skipped and counted under
`on_bad_record: skip`), a file that cannot be read at all is one `DataError` that names it and says what to do."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune.data.layer import DatasetReport, stream_dataset
from finetune.data.records import read_records
from finetune.errors import DataError
from finetune.recipe import DatasetSection
from finetune.recipe.data_policy import DataPolicy
from reward.model import CARD_FILE

INSTRUCTIONS = [
    {"instruction": "Who wrote 静夜思?", "output": "Li Bai, a poet of the Tang dynasty."},
    {"instruction": "Which river flows through Wuhan?", "output": "The Yangtze, China's longest river."},
    {"instruction": "What does a seal carver cut?", "output": "Characters in reverse, into soft stone."},
]
SCORE_INPUTS = [{"prompt": r["instruction"], "response": r["output"]} for r in INSTRUCTIONS]
CHATS = [
    {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
    for r in INSTRUCTIONS
]
DEEP = b"[" * 100_000 + b"]" * 100_000


@dataclass
class BadRecord:
    """A file of good records with one bad record, where it is and why."""

    path: Path
    where: str  # file:line, file:row N or file[i]
    reason: str
    fmt: str = "instruction"
    good: int = 3


# --- files with one bad record among good ones: rows are flat records, the bad one goes third -------------------


def _json_line(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


def _jsonl(tmp_path: Path, rows: list[dict], bad: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    lines = [_json_line(r) for r in rows]
    path.write_bytes(b"\n".join([*lines[:2], bad, *lines[2:]]) + b"\n")
    return path


def _latin1(row: dict) -> bytes:
    """A record whose every value is "café" written in Latin-1 (é is byte 0xe9)."""
    return _json_line(dict.fromkeys(row, "café")).replace("é".encode(), b"\xe9")


def non_utf8_jsonl_line(tmp_path: Path, rows: list[dict]) -> BadRecord:
    bad = _latin1(rows[0])
    path = _jsonl(tmp_path, rows, bad)
    column = bad.index(b"\xe9") + 1  # the line is ASCII up to there: bytes and characters agree
    return BadRecord(path, f"{path}:3", f"not UTF-8 (byte 0xe9 at column {column}); save the file as UTF-8")


def deep_jsonl_line(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _jsonl(tmp_path, rows, b'{"' + next(iter(rows[0])).encode() + b'": ' + DEEP + b"}")
    return BadRecord(path, f"{path}:3", "not readable: JSON nested too deeply")


def huge_number_jsonl_line(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _jsonl(tmp_path, rows, b'{"' + next(iter(rows[0])).encode() + b'": 1' + b"0" * 5000 + b"}")
    return BadRecord(path, f"{path}:3", "not readable JSON (Exceeds the limit (4300 digits)")


def lone_surrogate_jsonl_line(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _jsonl(tmp_path, rows, _json_line({**rows[0], "note": "x"}).replace(b'"x"', b'"\\udcff"'))
    return BadRecord(path, f"{path}:3", "holds \\udcff: half of a surrogate pair, not a character")


def _csv(tmp_path: Path, rows: list[dict], bad: list[str]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerows([list(rows[0]), *[r.values() for r in rows[:2]], bad, *[r.values() for r in rows[2:]]])
    path = tmp_path / "data.csv"
    path.write_bytes(text.getvalue().encode("utf-8").replace("é".encode(), b"\xe9"))
    return path


def csv_row_with_a_field_too_many(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _csv(tmp_path, rows, [*rows[0].values(), "one more"])
    return BadRecord(path, f"{path}:row 3", "3 fields but the header has 2")


def csv_row_with_a_field_too_few(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _csv(tmp_path, rows, [next(iter(rows[0].values()))])
    return BadRecord(path, f"{path}:row 3", "1 field but the header has 2")


def non_utf8_csv_row(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _csv(tmp_path, rows, ["café" for _ in rows[0]])
    first = next(iter(rows[0]))
    return BadRecord(path, f"{path}:row 3", f"not UTF-8 (byte 0xe9 in column '{first}'); save the file as UTF-8")


def non_utf8_json_record(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = tmp_path / "data.json"
    items = [_json_line(r) for r in rows]
    path.write_bytes(b"[\n" + b",\n".join([*items[:2], _latin1(rows[0]), *items[2:]]) + b"\n]\n")
    return BadRecord(path, f"{path}[2]", "not UTF-8 (byte 0xe9); save the file as UTF-8")


def whitespace_assistant_reply(tmp_path: Path, rows: list[dict]) -> BadRecord:
    bad = {"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": " \n\t "}]}
    path = _jsonl(tmp_path, CHATS, _json_line(bad))
    return BadRecord(path, f"{path}:3", "messages[1]: the assistant reply is only whitespace", fmt="chat")


def whitespace_instruction_output(tmp_path: Path, rows: list[dict]) -> BadRecord:
    path = _jsonl(tmp_path, INSTRUCTIONS, _json_line({"instruction": "Say something.", "output": "   "}))
    return BadRecord(path, f"{path}:3", "output: only whitespace")


ROW_CASES: list[Callable[[Path, list[dict]], BadRecord]] = [
    non_utf8_jsonl_line,
    deep_jsonl_line,
    huge_number_jsonl_line,
    lone_surrogate_jsonl_line,
    csv_row_with_a_field_too_many,
    csv_row_with_a_field_too_few,
    non_utf8_csv_row,
    non_utf8_json_record,
]
RECORD_CASES = [*ROW_CASES, whitespace_assistant_reply, whitespace_instruction_output]


# --- files that cannot be read at all: (path, what the one DataError says) ----------------------------------------


def _jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def utf16_jsonl_with_bom(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl_text(rows).encode("utf-16"))
    return path, "the file is UTF-16; save it as UTF-8"


def utf16_jsonl_without_bom(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl_text(rows).encode("utf-16-le"))
    return path, "the file is UTF-16; save it as UTF-8"


def utf16_csv(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.csv"
    path.write_bytes((",".join(rows[0]) + "\n" + "".join(",".join(r.values()) + "\n" for r in rows)).encode("utf-16"))
    return path, "the file is UTF-16; save it as UTF-8"


def utf16_json(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps(rows, ensure_ascii=False).encode("utf-16"))
    return path, "the file is UTF-16; save it as UTF-8"


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def parquet_of_random_bytes(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.parquet"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path, f"{path}: not a readable Parquet file"


def truncated_parquet(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.parquet"
    whole = _parquet(rows)
    path.write_bytes(whole[: len(whole) // 2])
    return path, f"{path}: not a readable Parquet file"


def deep_json(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.json"
    path.write_bytes(b"[" + b",".join([_json_line(rows[0]), DEEP, _json_line(rows[1])]) + b"]")
    return path, f"{path}: not readable: JSON nested too deeply"


def json_that_does_not_parse(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.json"
    path.write_bytes(b"[\n" + _json_line(rows[0]) + b',\n{"instruction": }\n]')
    return path, f"{path}:3: not valid JSON (Expecting value at column 17); the whole file is one JSON document"


def csv_quote_never_closed(tmp_path: Path, rows: list[dict]) -> tuple[Path, str]:
    path = tmp_path / "data.csv"
    path.write_text(",".join(rows[0]) + '\na,b\n"c,d\ne,f\n', encoding="utf-8")
    return path, f"{path}:3: a quoted value that starts on this line is never closed"


FILE_CASES: list[Callable[[Path, list[dict]], tuple[Path, str]]] = [
    utf16_jsonl_with_bom,
    utf16_jsonl_without_bom,
    utf16_csv,
    utf16_json,
    parquet_of_random_bytes,
    truncated_parquet,
    deep_json,
    json_that_does_not_parse,
    csv_quote_never_closed,
]


def layer(path: Path, fmt: str, on_bad: str) -> tuple[list[dict], DatasetReport, list[tuple[str, str]]]:
    """Records that pass the data layer for one file, its report, and the bad records skipped."""
    report, skipped = DatasetReport(name="d", path="", format=""), []
    section = DatasetSection(path=str(path), format=fmt, on_bad_record=on_bad)
    return (
        [record for _, record in stream_dataset("d", section, DataPolicy(), report, skipped=skipped)],
        report,
        skipped,
    )


@pytest.fixture
def reward_folder(tmp_path) -> Path:
    """Enough of a reward model folder to be found: the inputs are read before the model is loaded."""
    folder = tmp_path / "reward_model"
    folder.mkdir()
    (folder / CARD_FILE).write_text("{}", encoding="utf-8")
    return folder


# --- one bad record ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", RECORD_CASES)
def test_a_bad_record_is_listed_with_file_line_and_reason_under_fail(tmp_path, make):
    case = make(tmp_path, INSTRUCTIONS)
    with pytest.raises(DataError) as info:
        read_records(case.path, case.fmt, "fail")
    assert f"1 bad record in {case.path}" in str(info.value)
    assert f"  - {case.where}: {case.reason}" in str(info.value)


@pytest.mark.parametrize("make", RECORD_CASES)
def test_a_bad_record_is_skipped_and_the_good_ones_still_read_under_skip(tmp_path, make):
    case = make(tmp_path, INSTRUCTIONS)
    result = read_records(case.path, case.fmt, "skip")
    assert len(result.records) == case.good
    assert [where for where, _ in result.skipped] == [case.where]
    assert result.skipped[0][1].startswith(case.reason)


@pytest.mark.parametrize("make", RECORD_CASES)
def test_the_data_layer_counts_a_skipped_bad_record_and_keeps_the_rest(tmp_path, make):
    case = make(tmp_path, INSTRUCTIONS)
    kept, report, skipped = layer(case.path, case.fmt, "skip")
    assert (len(kept), report.kept, report.bad_records) == (case.good, case.good, 1)
    assert [where for where, _ in skipped] == [case.where] and skipped[0][1].startswith(case.reason)


@pytest.mark.parametrize("make", RECORD_CASES)
def test_the_data_layer_lists_a_bad_record_under_fail(tmp_path, make):
    case = make(tmp_path, INSTRUCTIONS)
    with pytest.raises(DataError, match="on_bad_record: skip") as info:
        layer(case.path, case.fmt, "fail")
    assert f"  - {case.where}: {case.reason}" in str(info.value)


@pytest.mark.parametrize("make", RECORD_CASES)
def test_data_check_names_the_bad_record_without_a_traceback(tmp_path, cli, make):
    case = make(tmp_path, INSTRUCTIONS)
    code, out, err = cli("data", "check", case.path)
    text = " ".join((out + err).split())  # the CLI wraps long lines
    assert code == 2 and "Traceback" not in out + err
    assert f"{case.where}: {case.reason}" in text


@pytest.mark.parametrize("make", ROW_CASES)
def test_reward_score_names_the_bad_input_line_without_a_traceback(tmp_path, cli, reward_folder, make):
    case = make(tmp_path, SCORE_INPUTS)
    code, out, err = cli("reward", "score", reward_folder, "--input", case.path)
    text = " ".join((out + err).split())
    assert code == 2 and "Traceback" not in out + err
    assert f"1 bad line(s) in {case.path}" in text and f"{case.where}: {case.reason}" in text


def test_reward_score_names_a_message_without_content(tmp_path, cli, reward_folder):
    path = _jsonl(
        tmp_path, SCORE_INPUTS, _json_line({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]})
    )
    code, out, err = cli("reward", "score", reward_folder, "--input", path)
    assert code == 2 and "Traceback" not in out + err
    assert f"{path}:3: messages[1] needs a `role` and a `content`" in " ".join((out + err).split())


def test_data_check_lists_a_bad_first_line_with_the_rest_instead_of_stopping_at_it(tmp_path, cli):
    path = tmp_path / "data.jsonl"
    lines = [_json_line(r) for r in CHATS]
    path.write_bytes(b"\n".join([_latin1(CHATS[0]), *lines, b"[" * 10 + b"]" * 10]) + b"\n")
    code, out, err = cli("data", "check", path)
    text = " ".join((out + err).split())
    assert code == 2 and "2 bad records" in text
    assert f"{path}:1: not UTF-8 (byte 0xe9" in text and f"{path}:5: a record must be a JSON object" in text


# --- a file that cannot be read at all ----------------------------------------------------------------------------


@pytest.mark.parametrize("on_bad", ["fail", "skip"])
@pytest.mark.parametrize("make", FILE_CASES)
def test_an_unreadable_file_is_one_error_naming_it_and_what_to_do(tmp_path, make, on_bad):
    path, message = make(tmp_path, INSTRUCTIONS)
    with pytest.raises(DataError) as info:
        read_records(path, "instruction", on_bad)
    assert str(path) in str(info.value) and message in str(info.value)
    with pytest.raises(DataError) as info:
        layer(path, "instruction", on_bad)
    assert message in str(info.value)


@pytest.mark.parametrize("make", FILE_CASES)
def test_data_check_says_why_a_file_cannot_be_read_without_a_traceback(tmp_path, cli, make):
    path, message = make(tmp_path, INSTRUCTIONS)
    code, out, err = cli("data", "check", path)
    assert code == 2 and "Traceback" not in out + err
    assert message in " ".join((out + err).split())


@pytest.mark.parametrize("make", FILE_CASES)
def test_reward_score_says_why_an_input_file_cannot_be_read_without_a_traceback(tmp_path, cli, reward_folder, make):
    path, message = make(tmp_path, SCORE_INPUTS)
    code, out, err = cli("reward", "score", reward_folder, "--input", path)
    assert code == 2 and "Traceback" not in out + err
    assert message in " ".join((out + err).split())


# --- what is accepted -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_a_utf8_bom_at_the_start_is_accepted(tmp_path, name):
    path = tmp_path / name
    text = _jsonl_text(INSTRUCTIONS) if name.endswith(".jsonl") else json.dumps(INSTRUCTIONS, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    result = read_records(path, "instruction", "fail")
    assert result.records[0]["instruction"] == INSTRUCTIONS[0]["instruction"] and not result.skipped
