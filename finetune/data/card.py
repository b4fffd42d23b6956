"""Data cards (markdown + JSON) and the sensitive-topic register, for a stage folder or any output folder.

A stage folder gets `data_card.md`, `data_card.json` and `sensitive_register.jsonl` covering every
dataset the stage read (its training and eval sets); each dataset's section is replaced when the
stage reads it again (a resumed stage), so the files always describe the last reading.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from finetune.data.layer import DatasetReport, RegisterEntry
from finetune.recipe.data_policy import DataPolicy
from finetune.run_dir import DATA_CARD_FILE, REGISTER_FILE, atomic_write_text, utc_now

CARD_JSON = "data_card.json"
CARD_MD = DATA_CARD_FILE


class DataCard(BaseModel):
    """What went into training (or would): per dataset, sizes, rights, grades, PII, duplicates, exclusions."""

    stage: str | None = None
    updated: str
    policy: dict = Field(
        default_factory=dict, description="The data policy applied (intended use, grades, licences, ...)."
    )
    datasets: list[DatasetReport] = Field(default_factory=list)
    mixture: dict | None = Field(
        None, description="When the stage mixed datasets by weight: the strategy and each dataset's share drawn."
    )


def write_stage_files(
    stage_dir: Path, report: DatasetReport, register: list[RegisterEntry], policy: DataPolicy
) -> None:
    """Add (or replace) one dataset in a stage folder's data card and register."""
    card = read_card(stage_dir) or DataCard(stage=stage_dir.name, updated=utc_now())
    card.datasets = [d for d in card.datasets if d.name != report.name] + [report]
    card.updated, card.policy = utc_now(), policy_summary(policy)
    write_card(stage_dir, card)
    entries = [e for e in read_register(stage_dir) if e.dataset != report.name]
    entries += [e.model_copy(update={"stage": stage_dir.name}) for e in register]
    write_register(stage_dir / REGISTER_FILE, entries)


def write_card(folder: Path, card: DataCard) -> tuple[Path, Path]:
    """Write data_card.json and data_card.md into `folder`, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CARD_JSON, card.model_dump_json(indent=2))
    atomic_write_text(folder / CARD_MD, render_markdown(card))
    return folder / CARD_MD, folder / CARD_JSON


def write_register(path: Path, entries: list[RegisterEntry]) -> None:
    """The register as JSON lines (written even when empty: an empty register is a statement too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(e.model_dump_json() + "\n" for e in entries))


def read_card(folder: Path) -> DataCard | None:
    """The data card in `folder`, if there is one."""
    path = folder / CARD_JSON
    return DataCard.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_register(folder: Path) -> list[RegisterEntry]:
    """The entries of the register in `folder` (none if it has no register)."""
    path = folder / REGISTER_FILE
    if not path.is_file():
        return []
    return [
        RegisterEntry.model_validate_json(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def policy_summary(policy: DataPolicy) -> dict:
    """The policy as it appears on a card."""
    return {
        "intended_use": policy.intended_use,
        "grades": policy.grades,
        "max_sensitivity": policy.grades[policy.max_grade()],
        "licences": policy.licences or f"any that permits {policy.intended_use} use",
        "allow_missing_rights": policy.allow_missing_rights,
        "pii": policy.pii.action,
        "pii_types": policy.pii.types + (["person"] if policy.pii.names != "none" else []),
        "dedup": {
            "exact": policy.dedup.exact,
            "near": policy.dedup.near,
            "threshold": policy.dedup.threshold,
            "ngram": policy.dedup.ngram,
            "check_against": policy.dedup.check_against,
        },
        "topic_list": policy.topic_list,
    }


def render_markdown(card: DataCard) -> str:
    """The card for people: one section per dataset, tables of counts."""
    title = f"Data card — stage `{card.stage}`" if card.stage else "Data card"
    lines = [f"# {title}", "", f"Updated {card.updated}.", "", "## Policy", ""]
    lines += [f"- **{k.replace('_', ' ')}**: {_inline(v)}" for k, v in card.policy.items()]
    for d in card.datasets:
        lines += ["", f"## Dataset `{d.name}`", "", f"`{d.path}` (format {d.format}, {d.file_bytes:,} bytes)", ""]
        lines += [
            "| | records |",
            "| --- | ---: |",
            f"| read | {d.records_read} |",
            f"| bad (skipped) | {d.bad_records} |",
            f"| excluded by policy | {sum(d.excluded.values())} |",
            f"| duplicates removed | {sum(d.duplicates.values())} |",
            f"| **kept** | **{d.kept}** |",
            "",
            f"{d.characters:,} characters of text kept; "
            f"{d.pii_records} records held personal data ({d.pii_action}); {d.registered} in the sensitive-topic register.",
            "",
        ]
        if d.augmented:
            lines += [f"{d.augmented} counterfactual copies added (data.augment), marked `augmented`.", ""]
        for heading, counts in (
            ("Languages", d.languages),
            ("Licences", d.licences),
            ("Sources", d.sources),
            ("Sensitivity grades", d.grades),
            ("Topics", d.topics),
            ("Excluded, by reason", d.excluded),
            ("Personal data found, by type", d.pii_found),
            ("Duplicates removed", d.duplicates),
            *([("Counterfactual swaps, by term", d.augmented_swaps)] if d.augmented else []),
        ):
            lines += _table(heading, counts)
    if card.mixture:
        lines += ["", f"## Mixture ({card.mixture['strategy']})", ""]
        lines += [
            "| dataset | weight | sequences available | drawn | share drawn |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| `{m['dataset']}` | {m['weight']:.3f} | {m['available']} | {m['drawn']} | {m['share']:.3f} |"
            for m in card.mixture["shares"]
        ]
    return "\n".join(lines) + "\n"


def _table(heading: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return [f"**{heading}**: none", ""]
    rows = [f"| {k} | {v} |" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return [f"**{heading}**", "", "| | count |", "| --- | ---: |", *rows, ""]


def _inline(value: object) -> str:
    return (
        ", ".join(map(str, value))
        if isinstance(value, list)
        else json.dumps(value, ensure_ascii=False)
        if isinstance(value, dict)
        else str(value)
    )
