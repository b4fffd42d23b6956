"""`wenmai data check | scrub | card`: the data layer on a recipe's datasets or on a single data file."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from finetune.config_io import load_recipe
from finetune.data import augmented_datasets, policy_file_problems
from finetune.data.augment import Swapper, augment_records
from finetune.data.card import DataCard, policy_summary, write_card, write_register
from finetune.data.dedup import ReferenceIndex
from finetune.data.layer import DatasetReport, RegisterEntry, reference_for, stream_dataset
from finetune.data.pii import Scrubber, build_scrubber
from finetune.data.records import RECORD_MODELS, iter_raw
from finetune.errors import DataError
from finetune.recipe import DatasetSection
from finetune.recipe.data_policy import DataPolicy
from finetune.run_dir import REGISTER_FILE, atomic_open, utc_now

RECIPE_SUFFIXES = (".yaml", ".yml")
DETECT_ROWS = 20  # rows looked at to tell a file's record format


@dataclass
class Target:
    """One dataset to run through the layer, with the policy and evaluation text that apply to it."""

    name: str
    section: object  # a DatasetSection
    policy: DataPolicy
    scrubber: Scrubber | None
    reference: ReferenceIndex | None
    swapper: Swapper | None = None  # data.augment covers this dataset: count its counterfactual copies


def check(target: Path, fmt: str | None = None, recipe: Path | None = None) -> list[DatasetReport]:
    """Reports for every dataset of a recipe, or for one data file; writes nothing."""
    return [_run(t)[0] for t in targets(target, fmt, recipe)]


def scrub(
    source: Path, dest: Path, fmt: str | None = None, recipe: Path | None = None, dedup: bool = True
) -> DatasetReport:
    """Stream the records of `source` that may train, scrubbed (and deduplicated), into JSONL `dest`."""
    if source.suffix.lower() in RECIPE_SUFFIXES:
        raise DataError(
            f"{source} is a recipe; `wenmai data scrub` cleans one data file (take the policy from a recipe with --recipe)"
        )
    if dest.resolve() == source.resolve():
        raise DataError(f"{dest}: write the cleaned records to a new file, not over the input")
    [item] = targets(source, fmt, recipe)
    report = DatasetReport(name=item.name, path="", format="")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(dest) as out:
        for _, record in stream_dataset(
            item.name, item.section, item.policy, report, scrubber=item.scrubber, reference=item.reference, dedup=dedup
        ):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return report


def card(target: Path, out_dir: Path, fmt: str | None = None, recipe: Path | None = None) -> list[Path]:
    """Write data_card.md/.json and sensitive_register.jsonl for a recipe's datasets or a data file into `out_dir`."""
    items = targets(target, fmt, recipe)
    reports, register = [], []
    for item in items:
        report, entries = _run(item)
        reports.append(report)
        register += entries
    data_card = DataCard(updated=utc_now(), policy=policy_summary(items[0].policy), datasets=reports)
    paths = list(write_card(out_dir, data_card))
    write_register(out_dir / REGISTER_FILE, register)
    return [*paths, out_dir / REGISTER_FILE]


def targets(target: Path, fmt: str | None, recipe: Path | None) -> list[Target]:
    """A recipe's datasets (with its policy and eval sets), or one data file under a recipe's or the default policy."""
    if target.suffix.lower() in RECIPE_SUFFIXES:
        loaded = load_recipe(target, checks=[policy_file_problems]).recipe
        scrubber = build_scrubber(loaded.data.policy.pii)
        augmented = augmented_datasets(loaded)
        swapper = Swapper.from_section(loaded.data.augment) if augmented else None
        return [
            Target(
                name,
                section,
                loaded.data.policy,
                scrubber,
                reference_for(loaded, name, scrubber),
                swapper if name in augmented else None,
            )
            for name, section in loaded.data.items()
        ]
    if not target.is_file():
        raise DataError(f"{target}: no such file; give a data file (.jsonl, .json, .parquet, .csv) or a recipe (.yaml)")
    policy = (
        load_recipe(recipe, checks=[policy_file_problems]).recipe.data.policy if recipe is not None else DataPolicy()
    )
    section = DatasetSection(path=str(target), format=fmt or detect_format(target))
    return [Target(target.stem, section, policy, build_scrubber(policy.pii), None)]


def detect_format(path: Path) -> str:
    """The first record format whose model accepts one of the file's first readable records.

    Rows that cannot be read are passed over here: the data layer lists them all, with file:line.
    """
    first_problem = None
    for where, raw in islice(iter_raw(path), DETECT_ROWS):
        if isinstance(raw, Exception):
            first_problem = first_problem or f"{where}: {raw}"
            continue
        for name, model in RECORD_MODELS.items():
            with contextlib.suppress(ValueError):
                model.model_validate(raw)
                return name
        first_problem = first_problem or (
            f"{where}: cannot tell the record format (fields: {', '.join(raw)}); give --format "
            f"({', '.join(RECORD_MODELS)})"
        )
    raise DataError(first_problem or f"{path}: no records")


def _run(item: Target) -> tuple[DatasetReport, list[RegisterEntry]]:
    report, register, kept = DatasetReport(name=item.name, path="", format=""), [], []
    for _, record in stream_dataset(
        item.name, item.section, item.policy, report, register, scrubber=item.scrubber, reference=item.reference
    ):
        if item.swapper is not None:  # what a training run adds: the counterfactual copies, counted as it counts them
            kept.append(record)
    if item.swapper is not None:
        copies, swaps = augment_records(kept, item.section.record_format, item.swapper)
        report.augmented, report.augmented_swaps = len(copies), swaps
    return report, register
