"""Rights, provenance and sensitivity: the record metadata model, the recipe's `data.policy`, and its verdicts.

Imports only pydantic: the recipe schema uses these classes, and `wenmai validate` must start fast.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from finetune.recipe import licences

DEFAULT_GRADES = ("public", "internal", "restricted", "prohibited")
PII_TYPES = ("id_card", "mobile", "landline", "email", "bank_card", "passport", "ip", "person")
METADATA_FIELDS = ("source", "licence", "license", "rights_holder", "sensitivity", "topics", "consent")
Use = Literal["research", "non-commercial", "commercial", "internal"]


class Source(BaseModel):
    """Where a record comes from."""

    model_config = ConfigDict(extra="forbid")
    institution: str | None = Field(None, description="Holding institution (museum, archive, publisher).")
    collection: str | None = Field(None, description="Collection or fonds within the institution.")
    object_id: str | None = Field(None, description="Object, accession or document id.")
    url: str | None = Field(None, description="Where the object or record can be looked up.")

    def label(self) -> str:
        """Institution / collection, for counts on a data card."""
        return " / ".join(p for p in (self.institution, self.collection) if p) or "unknown"


class RecordMetadata(BaseModel):
    """Rights and provenance of a record: optional fields on the record, or defaults for a whole file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    source: Source | None = Field(
        None, description="`{institution, collection, object_id, url}`, or just the institution's name."
    )
    licence: str | None = Field(
        None,
        validation_alias=AliasChoices("licence", "license"),
        description="SPDX id (CC0-1.0, CC-BY-NC-4.0, ...), a rightsstatements.org id (InC-EDU), or a custom "
        "statement declared in data.policy.custom_licences.",
    )
    rights_holder: str | None = Field(None, description="Who holds the rights.")
    sensitivity: str | None = Field(
        None, description="A grade from data.policy.grades (default: the lowest, e.g. public)."
    )
    topics: list[str] = Field(default_factory=list, description="Topic tags; matched against the policy's topic list.")
    consent: bool | None = Field(
        None, description="For personal data: true = the person consented; false = refused or withdrawn (never trains)."
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source_text(cls, value: Any) -> Any:
        return {"institution": value} if isinstance(value, str) else value

    @field_validator("topics", mode="before")
    @classmethod
    def _one_topic(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def with_defaults(self, defaults: RecordMetadata | None) -> RecordMetadata:
        """This record's metadata, missing fields filled from the file's defaults (source merges key by key)."""
        if defaults is None:
            return self
        merged = defaults.model_dump(exclude_unset=True) | self.model_dump(exclude_unset=True)
        if defaults.source and self.source:
            merged["source"] = defaults.source.model_dump(exclude_none=True) | self.source.model_dump(exclude_none=True)
        return RecordMetadata.model_validate(merged)


class PiiOptions(BaseModel):
    """Personal data: which kinds to look for and what to do with a record that has some."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["mask", "drop", "off"] = Field(
        "mask",
        description="mask: replace with typed placeholders (<PHONE>, <ID_CARD>, ...); drop: exclude the record; off: do nothing.",
    )
    types: list[Literal["id_card", "mobile", "landline", "email", "bank_card", "passport", "ip", "person"]] = Field(
        default_factory=lambda: [t for t in PII_TYPES if t != "person"],
        description="Kinds to detect; `person` needs a name detector (`names`).",
    )
    names: str = Field(
        "none",
        description="Person-name detector: none, list (names from `name_list`), or a detector installed as a "
        "`wenmai.name_detectors` entry point.",
    )
    name_list: str | None = Field(
        None,
        description="File with one name per line (donors, staff) for `names: list`.",
        json_schema_extra={"is_path": True},
    )
    keep_with_consent: bool = Field(False, description="Leave personal data unmasked in records with `consent: true`.")

    @field_validator("action", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class DedupOptions(BaseModel):
    """Duplicates within the data, and overlap with evaluation sets."""

    model_config = ConfigDict(extra="forbid")
    exact: bool = Field(
        False,
        description="Drop records whose normalised text (NFKC, case, spaces and punctuation ignored) was seen before.",
    )
    near: bool = Field(
        False, description="Drop near-duplicates (MinHash/LSH on character n-grams; needs the `data` extra)."
    )
    threshold: float = Field(
        0.55,
        gt=0,
        lt=1,
        description="Estimated Jaccard similarity of shingles at which two records "
        "count as near-duplicates (measured: reworded duplicates 0.40-0.75, distinct templated "
        "records up to 0.48).",
    )
    ngram: int = Field(
        2,
        ge=1,
        le=8,
        description="Shingles are runs of 1 to `ngram` units; a unit is a Chinese "
        "character or a word of an alphabetic script.",
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (memory per record: 4 bytes each).")
    check_against: list[str] = Field(
        default_factory=list,
        json_schema_extra={"is_path": True},
        description="Evaluation files or folders (CSV, JSONL, JSON, Parquet; e.g. a CMMLU folder): training records "
        "that repeat or paraphrase their text are dropped. Eval datasets of the recipe's stages are always checked.",
    )
    min_chars: int = Field(
        12, ge=1, description="Text pieces shorter than this (after normalising) are not compared with evaluation sets."
    )


class DataPolicy(BaseModel):
    """What may train: intended use, the highest sensitivity grade, licences, and the cleaning applied to every record."""

    model_config = ConfigDict(extra="forbid")
    intended_use: Use = Field(
        "research",
        description="What the trained model is for: research, non-commercial, "
        "commercial or internal; decides which licences may train.",
    )
    grades: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GRADES),
        min_length=2,
        description="Sensitivity grades, lowest first; the last one never trains.",
    )
    max_sensitivity: str | None = Field(
        None, description="Highest grade allowed into training (default: every grade below the last)."
    )
    licences: list[str] | None = Field(
        None,
        description="Licences allowed (default: every licence that permits `intended_use`, except no-derivatives "
        "ones such as CC-BY-ND-4.0, which train only when named here).",
    )
    custom_licences: dict[str, list[Use]] = Field(
        default_factory=dict,
        description="Your own rights statements and the uses each permits, "
        "e.g. {museum-internal: [internal, research]}.",
    )
    allow_missing_rights: bool = Field(
        True, description="Let records without a licence (own or the file's default) train."
    )
    topic_list: str | None = Field(
        None,
        description="YAML file of sensitive topics and their keywords; matching records go to the register.",
        json_schema_extra={"is_path": True},
    )
    pii: PiiOptions = Field(default_factory=PiiOptions)
    dedup: DedupOptions = Field(default_factory=DedupOptions)

    def check(self) -> list[tuple[str, str]]:
        """Problems within the policy, as (field, message) pairs."""
        problems = []
        if len(set(self.grades)) != len(self.grades):
            problems.append(("grades", "grade names must be unique"))
        if self.max_sensitivity is not None and self.max_sensitivity not in self.grades:
            problems.append(
                ("max_sensitivity", f"unknown grade {self.max_sensitivity!r}; grades: {', '.join(self.grades)}")
            )
        elif self.max_sensitivity == self.grades[-1]:
            problems.append(
                (
                    "max_sensitivity",
                    f"{self.grades[-1]!r} is the highest grade and never trains; allow at most {self.grades[-2]!r}",
                )
            )
        for i, name in enumerate(self.licences or []):
            known = licences.canonical(name, self.custom_licences)
            if known is None:
                problems.append((f"licences[{i}]", licences.unknown_licence_message(name, self.custom_licences)))
            elif self.intended_use not in licences.permitted_uses(known, self.custom_licences, explicitly_allowed=True):
                problems.append(
                    (
                        f"licences[{i}]",
                        f"{known} does not permit {self.intended_use} use, so it can never "
                        "train this model; remove it or change intended_use",
                    )
                )
        if self.pii.names == "list" and not self.pii.name_list:
            problems.append(("pii.name_list", "names: list needs a name_list file (one name per line)"))
        return problems

    def max_grade(self) -> int:
        """Index of the highest grade allowed into training."""
        return self.grades.index(self.max_sensitivity) if self.max_sensitivity in self.grades else len(self.grades) - 2

    def metadata_problems(self, meta: RecordMetadata) -> list[tuple[str, str]]:
        """Licence and grade names this policy does not know, as (field, message) pairs."""
        problems = []
        if meta.licence is not None and licences.canonical(meta.licence, self.custom_licences) is None:
            problems.append(("licence", licences.unknown_licence_message(meta.licence, self.custom_licences)))
        if meta.sensitivity is not None and meta.sensitivity not in self.grades:
            problems.append(
                (
                    "sensitivity",
                    f"unknown grade {meta.sensitivity!r}; grades (data.policy.grades): {', '.join(self.grades)}",
                )
            )
        return problems

    def exclusion(self, meta: RecordMetadata) -> str | None:
        """Why this policy keeps a record out of training (a short reason used as a count key), or None."""
        if meta.consent is False:
            return "consent: refused or withdrawn"
        grade = meta.sensitivity or self.grades[0]
        if self.grades.index(grade) > self.max_grade():
            return f"sensitivity: {grade} (above {self.grades[self.max_grade()]})"
        if meta.licence is None:
            return None if self.allow_missing_rights else "rights: no licence (allow_missing_rights is false)"
        licence = licences.canonical(meta.licence, self.custom_licences) or meta.licence
        allowed = (
            {licences.canonical(n, self.custom_licences) for n in self.licences} if self.licences is not None else None
        )
        named = allowed is not None and licence in allowed
        if self.intended_use not in licences.permitted_uses(licence, self.custom_licences, explicitly_allowed=named):
            if licences.needs_explicit_allowance(licence, self.intended_use, self.custom_licences):
                return f"licence: {licence} allows no derivative works (name it in data.policy.licences to train on it)"
            return f"licence: {licence} does not permit {self.intended_use} use"
        if allowed is not None and not named:
            return f"licence: {licence} not in data.policy.licences"
        return None


def record_metadata(record: dict) -> dict:
    """The metadata fields a record carries (the rest is its content)."""
    return {k: record[k] for k in METADATA_FIELDS if k in record and record[k] is not None}
