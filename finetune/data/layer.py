"""The cultural data layer: every record on its way to a trainer passes policy -> PII scrub -> dedup.

One streaming pass per dataset: records are read, given their metadata (own fields, or the file's
`defaults`), kept out when the policy says so (counted by reason), scrubbed, checked against what was
kept before and against evaluation sets, and registered when sensitive. Nothing is dropped silently:
every exclusion is a count in the dataset's report, which becomes its data card.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from finetune.data.dedup import Deduplicator, NearIndex, ReferenceIndex
from finetune.data.pii import Scrubber, build_scrubber
from finetune.data.preference import PREFERENCE_MODELS, check_record_set, record_context
from finetune.data.records import RecordSet, check_bad_records, iter_raw, iter_records, validated_records
from finetune.data.topics import TopicList
from finetune.errors import DataError
from finetune.recipe.data_policy import METADATA_FIELDS, DataPolicy, RecordMetadata, record_metadata
from finetune.recipe.options import marked_fields

if TYPE_CHECKING:
    from finetune.recipe import DatasetSection, Recipe

# Where each format keeps the text to scrub and compare; strings under these keys are walked (roles,
# ids and metadata skipped). A format not listed here has every non-metadata field treated as text.
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "instruction": ("instruction", "input", "output"),
    "text": ("text",),
    "pairs": ("prompt", "chosen", "rejected"),
    "ratings": ("prompt", "response"),
    "tiers": ("prompt", "responses"),
}
NOT_TEXT = frozenset({"role", "id", "lang", *METADATA_FIELDS})
EVAL_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json", ".parquet")
PROGRESS_MIN_BYTES = 8 << 20
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


class DatasetReport(BaseModel):
    """What the layer did to one dataset: the body of its data card."""

    name: str
    path: str
    format: str
    file_bytes: int = 0
    records_read: int = 0
    bad_records: int = 0
    kept: int = 0
    characters: int = Field(0, description="Characters of text in the kept records.")
    languages: dict[str, int] = Field(default_factory=dict)
    licences: dict[str, int] = Field(default_factory=dict)
    sources: dict[str, int] = Field(default_factory=dict)
    grades: dict[str, int] = Field(default_factory=dict)
    topics: dict[str, int] = Field(default_factory=dict)
    excluded: dict[str, int] = Field(default_factory=dict, description="Records kept out by the policy, by reason.")
    pii_action: str = "mask"
    pii_found: dict[str, int] = Field(default_factory=dict, description="Personal data found, by type.")
    pii_records: int = Field(0, description="Records that contained personal data.")
    duplicates: dict[str, int] = Field(
        default_factory=dict, description="Records dropped as duplicates: exact, near, eval: <set>."
    )
    registered: int = Field(0, description="Records written to the sensitive-topic register.")
    augmented: int = Field(0, description="Counterfactual copies added by data.augment (not counted in `kept`).")
    augmented_swaps: dict[str, int] = Field(default_factory=dict, description="Terms swapped in the copies, by term.")

    def bump(self, table: str, key: str, by: int = 1) -> None:
        """Add `by` to the count of `key` in one of the count tables."""
        counts = getattr(self, table)
        counts[key] = counts.get(key, 0) + by


class RegisterEntry(BaseModel):
    """One line of sensitive_register.jsonl: a sensitive record that a stage used."""

    record: str = Field(description="The record's `id`, or file:line when it has none.")
    where: str
    dataset: str
    stage: str | None = None
    source: str | None = None
    licence: str | None = None
    grade: str
    topics: list[str] = Field(default_factory=list)


@dataclass
class LayerRecords(RecordSet):
    """A dataset's records after the layer, its report and its register entries."""

    report: DatasetReport | None = None
    register: list[RegisterEntry] = field(default_factory=list)


def load_dataset(recipe: Recipe, name: str) -> LayerRecords:
    """The records of `name` that may train, with the layer's report and register entries."""
    policy = recipe.data.policy
    scrubber = build_scrubber(policy.pii)
    reference = reference_for(recipe, name, scrubber)
    report, register, skipped = DatasetReport(name=name, path="", format=""), [], []
    records = [
        r
        for _, r in stream_dataset(
            name,
            recipe.data[name],
            policy,
            report,
            register,
            skipped,
            scrubber=scrubber,
            reference=reference,
            context=record_context(recipe, name),
        )
    ]
    check_record_set(recipe.data[name].record_format, records, recipe.data[name].location)
    return LayerRecords(records, skipped, report, register)


def stream_dataset(
    name: str,
    section: DatasetSection,
    policy: DataPolicy,
    report: DatasetReport,
    register: list[RegisterEntry] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    *,
    scrubber: Scrubber | None = None,
    reference: ReferenceIndex | None = None,
    dedup: bool = True,
    context: dict | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield (file:line, record) for each record that may train; fill `report`, `register` and `skipped`.

    `scrubber` (default: the policy's) and `reference` let a caller build them once for several datasets;
    `context` is what records are checked against (the recipe's reward dimensions, a tier order).
    Preference data (pairs, ratings, tiers) is not deduplicated within itself: one prompt answered several
    times, the same answer rated by several raters, and near-identical answers are its signal. It is still
    checked against evaluation text.
    """
    fmt = section.record_format
    report.path, report.format, report.pii_action = section.location, fmt, policy.pii.action
    file = Path(section.path) if section.path is not None else None
    report.file_bytes = file.stat().st_size if file is not None and file.is_file() else 0
    skipped = [] if skipped is None else skipped
    scrubber = scrubber or build_scrubber(policy.pii)
    dedup = dedup and fmt not in PREFERENCE_MODELS
    deduplicator = Deduplicator(
        policy.dedup if dedup else policy.dedup.model_copy(update={"exact": False, "near": False}), reference
    )
    topics = TopicList.load(policy.topic_list)
    with _progress(file, name) as advance:
        for where, record in islice(dataset_records(section, skipped, context, scrubber, report), section.max_records):
            advance()
            report.records_read += 1
            try:
                meta = RecordMetadata.model_validate(record_metadata(record)).with_defaults(section.defaults)
            except ValidationError as err:
                skipped.append((where, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())))
                continue
            problems = policy.metadata_problems(meta)
            if problems:
                skipped.append((where, "; ".join(message for _, message in problems)))
                continue
            reason = policy.exclusion(meta)
            if reason is None:
                reason = _scrub(record, fmt, scrubber, policy, meta, report)
            if reason is not None:
                report.bump("excluded", reason)
                continue
            pieces = text_pieces(record, fmt)
            duplicate = deduplicator.verdict(pieces)
            if duplicate is not None:
                report.bump("duplicates", duplicate)
                continue
            _count_kept(report, record, meta, pieces, policy)
            hits = topics.match(meta.topics, pieces)
            grade = meta.sensitivity or policy.grades[0]
            if hits or grade != policy.grades[0]:
                report.registered += 1
                if register is not None:
                    register.append(_register_entry(record, where, name, meta, grade, hits))
            yield where, record
    report.bad_records = len(skipped)
    check_bad_records(section.location, fmt, skipped, section.on_bad_record)
    if report.kept == 0:
        raise DataError(_nothing_left(name, report))


def dataset_records(
    section: DatasetSection,
    bad: list[tuple[str, str]],
    context: dict | None,
    scrubber: Scrubber | None = None,
    report: DatasetReport | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for each valid record of a dataset: its file's, or a review session's cleaned feedback.

    A review session's items held back by cleaning and its noisy raters' scores are counted in `report.excluded`;
    comments are scrubbed like the record text.
    """
    if section.format != "review":
        yield from iter_records(section.path, section.format, bad, context)
        return
    try:  # the review store needs the `review` extra (SQLAlchemy): loaded only when a recipe reads a session
        from finetune.review import records as review_records
    except ModuleNotFoundError as err:
        raise DataError(
            f"dataset at {section.location}: reading a review session needs the `review` extra ({err.name} is not "
            "installed): pip install 'wenmai[review]'"
        ) from None

    rows = review_records.read_session(
        section.db, section.session, section.record_format, section.cleaning, _scrub_text(scrubber), section.as_of
    )
    if report is not None:
        for reason, count in rows.excluded.items():
            report.bump("excluded", reason, count)
    yield from validated_records(rows.records[section.record_format], section.record_format, bad, context)


def text_pieces(record: dict, fmt: str) -> list[str]:
    """The record's text, piece by piece (each message, each field), in the format's order."""
    return [container[key] for container, key in _text_slots(record, fmt)]


def reference_for(recipe: Recipe, name: str, scrubber: Scrubber | None) -> ReferenceIndex | None:
    """Evaluation text a training dataset must not contain: the recipe's eval datasets and `check_against` files."""
    options = recipe.data.policy.dedup
    roles = dataset_roles(recipe)
    if "train" not in roles.get(name, {"train"}):
        return None  # an evaluation set is never filtered against itself or others
    eval_names = [n for n, r in roles.items() if r == {"eval"} and n != name]
    if not eval_names and not options.check_against:
        return None
    near = NearIndex(options.threshold, options.ngram, options.num_perm) if options.near else None
    index = ReferenceIndex(options.min_chars, near=near)
    for eval_name in eval_names:
        section = recipe.data[eval_name]
        for _, record in dataset_records(section, [], None, scrubber):
            index.add(_scrubbed(text_pieces(record, section.record_format), scrubber), f"dataset {eval_name}")
    for root in map(Path, options.check_against):
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EVAL_SUFFIXES) if root.is_dir() else [root]
        if not files:
            raise DataError(
                f"data.policy.dedup.check_against: {root} holds no evaluation files ({', '.join(EVAL_SUFFIXES)})"
            )
        for path in files:
            label = str(path.relative_to(root.parent)) if root.is_dir() else path.name
            for row in _eval_rows(path):
                index.add(_scrubbed(_strings(row), scrubber), label)
    return index


def dataset_roles(recipe: Recipe) -> dict[str, set[str]]:
    """For each dataset a stage reads: `eval` when named by an `eval...` field, else `train`."""
    roles: dict[str, set[str]] = {}
    for config in recipe.stage_configs():
        for field_name, _ in marked_fields(type(config), "dataset"):
            value = getattr(config, field_name)
            for name in value if isinstance(value, dict) else [value] if value else []:  # a mixture: its names
                roles.setdefault(name, set()).add("eval" if field_name.startswith("eval") else "train")
    return roles


# --- helpers -----------------------------------------------------------------------------------


def _text_slots(record: dict, fmt: str) -> Iterator[tuple[Any, Any]]:
    keys = TEXT_FIELDS.get(fmt) or [k for k in record if k not in NOT_TEXT]
    for key in keys:
        if key in record:
            yield from _walk(record, key)


def _walk(container: Any, key: Any) -> Iterator[tuple[Any, Any]]:
    value = container[key]
    if isinstance(value, str):
        yield container, key
    elif isinstance(value, list):
        for i in range(len(value)):
            yield from _walk(value, i)
    elif isinstance(value, dict):
        for k in value:
            if k not in NOT_TEXT:
                yield from _walk(value, k)


def _scrub(
    record: dict, fmt: str, scrubber: Scrubber | None, policy: DataPolicy, meta: RecordMetadata, report: DatasetReport
) -> str | None:
    """Mask personal data in place and count it; the exclusion reason when the policy drops such records."""
    if scrubber is None or (policy.pii.keep_with_consent and meta.consent):
        return None
    found: dict[str, int] = {}
    for container, key in _text_slots(record, fmt):
        text, counts = scrubber.scrub(container[key])
        if counts:
            container[key] = text
            for kind, n in counts.items():
                found[kind] = found.get(kind, 0) + n
    if not found:
        return None
    report.pii_records += 1
    for kind, n in found.items():
        report.bump("pii_found", kind, n)
    return "pii: contains " + ", ".join(sorted(found)) if policy.pii.action == "drop" else None


def _count_kept(
    report: DatasetReport, record: dict, meta: RecordMetadata, pieces: list[str], policy: DataPolicy
) -> None:
    report.kept += 1
    report.characters += sum(map(len, pieces))
    report.bump("languages", record.get("lang") if isinstance(record.get("lang"), str) else _language(pieces))
    report.bump("licences", meta.licence or "none given")
    report.bump("sources", meta.source.label() if meta.source else "none given")
    report.bump("grades", meta.sensitivity or policy.grades[0])
    for topic in meta.topics:
        report.bump("topics", topic)


def _language(pieces: list[str]) -> str:
    sample = " ".join(pieces)[:400]
    cjk, latin = len(_CJK.findall(sample)), len(_LATIN.findall(sample))
    return "zh" if cjk and cjk * 4 >= latin else "en" if latin else "other"


def _register_entry(
    record: dict, where: str, dataset: str, meta: RecordMetadata, grade: str, topics: list[str]
) -> RegisterEntry:
    source = None
    if meta.source is not None:
        source = " / ".join(
            p for p in (meta.source.institution, meta.source.collection, meta.source.object_id, meta.source.url) if p
        )
    return RegisterEntry(
        record=str(record.get("id") or where),
        where=where,
        dataset=dataset,
        source=source,
        licence=meta.licence,
        grade=grade,
        topics=topics,
    )


def _nothing_left(name: str, report: DatasetReport) -> str:
    why = {**report.excluded, **{f"duplicate ({k})": v for k, v in report.duplicates.items()}}
    listed = "\n".join(f"  - {reason}: {count}" for reason, count in sorted(why.items(), key=lambda kv: -kv[1]))
    return (
        f"dataset {name!r}: no record is left to train on ({report.records_read} read, "
        f"{report.bad_records} bad):\n{listed or '  - (no valid records)'}\n"
        "Change data.policy (intended_use, max_sensitivity, licences, allow_missing_rights) or the "
        f"metadata of data.{name} (its `defaults` or the records' own fields)."
    )


def _scrub_text(scrubber: Scrubber | None):
    return None if scrubber is None else (lambda text: scrubber.scrub(text)[0])


def _scrubbed(texts: list[str], scrubber: Scrubber | None) -> list[str]:
    return [scrubber.scrub(t)[0] for t in texts] if scrubber is not None else texts


def _strings(row: dict) -> list[str]:
    out: list[str] = []
    for key in row:
        if key not in NOT_TEXT:
            out += [c[k] for c, k in _walk(row, key)]
    return out


def _eval_rows(path: Path) -> Iterator[dict]:
    """Rows of an evaluation file, read as data files are (a bad row is named, not a crash)."""
    for where, row in iter_raw(path):
        if isinstance(row, Exception):
            raise DataError(f"{where}: {row} (in data.policy.dedup.check_against)")
        yield row


@contextmanager
def _progress(path: Path | None, name: str) -> Iterator[Any]:
    """A progress bar on stderr for large files (records; the total is the line count of a JSONL file)."""
    size = path.stat().st_size if path is not None and path.is_file() else 0
    if size < PROGRESS_MIN_BYTES:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open("rb") as f:
            total = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    columns = (TextColumn(f"data layer: {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(name, total=total)
        pending = [0]

        def advance() -> None:  # the bar is updated every 1,024 records: a call per record costs throughput
            pending[0] += 1
            if pending[0] == 1024:
                bar.advance(task, pending[0])
                pending[0] = 0

        yield advance
