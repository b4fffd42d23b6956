"""The value-alignment suite file: probes, what a good answer does, rule checks and bias pairs.

A suite is YAML (`probes:`, `probes_from:` JSONL files such as the CValues prompts, `bias:`) or a
JSONL file with one probe a line (`prompt`, optional `id`/`id_` and the probe keys below; other
fields are kept as metadata). Every error names the suite file and line.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import ConfigError, Problem
from finetune.evaluation.bias_probes import AssociationProbe, ChoiceFile, ChoiceProbe, DecisionProbe
from finetune.yaml_lines import read_yaml_lines

Behaviour = Literal["refuses", "corrects_premise", "respectful", "cites_uncertainty"]
TOTAL = "total"  # the weighted total every reward model reports besides its dimensions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProbeOptions(_Strict):
    """Checks shared by a probe and by a `probes_from` file's probes."""

    expect: list[Behaviour] = Field(
        default_factory=list, description="What a good answer does (checked by marker words)."
    )
    language: Literal["auto", "zh", "en", "any"] = Field(
        "auto", description="The reply's language; auto: the prompt's."
    )
    banned: list[str] = Field(default_factory=list, description="Terms the reply must not contain (case-insensitive).")
    required_any: list[str] = Field(
        default_factory=list, description="A required disclaimer: at least one of these terms."
    )
    dimensions: list[str] | None = Field(None, description="Reward dimensions to score (default: every dimension).")
    system: str | None = Field(None, description="A system message before the prompt.")


class Probe(ProbeOptions):
    """One prompt and the checks on the model's reply."""

    id: str
    prompt: str = Field(..., min_length=1)
    tags: list[str] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)


class ProbeFile(ProbeOptions):
    """Probes read from a JSONL file (one `{"prompt": ...}` a line, e.g. the CValues prompts)."""

    path: str = Field(..., description="JSONL file, relative to the suite file.")
    limit: int | None = Field(None, gt=0, description="Use only the first N prompts.")


class BiasProbe(_Strict):
    """A prompt with a `{group}` slot, asked once per group term; the score gap across groups is reported."""

    id: str
    axis: str = Field(..., description="What differs: gender, ethnicity, region, religion, ...")
    template: str = Field(..., description="The prompt, with `{group}` where the group term goes.")
    groups: list[str] = Field(..., min_length=2, description="The group terms; the prompts differ only in these.")
    dimension: str = Field(TOTAL, description="The reward dimension whose gap is reported.")
    reference: str | None = Field(
        None, description="A fixed good answer; its likelihood gap across groups is reported too."
    )
    system: str | None = None

    @field_validator("template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{group}") != 1:
            raise ValueError("must contain `{group}` exactly once (where the group term goes)")
        return value

    @field_validator("groups")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("group terms must be distinct")
        return value

    def prompts(self) -> dict[str, str]:
        """The prompt for each group term."""
        return {group: self.template.replace("{group}", group) for group in self.groups}


class Suite(_Strict):
    """A value-alignment suite."""

    name: str
    description: str = ""
    licence: str = ""
    max_new_tokens: int = Field(64, gt=0, description="Reply length bound (greedy decoding).")
    banned: list[str] = Field(default_factory=list, description="Terms no reply may contain.")
    markers: dict[Behaviour, dict[str, list[str]]] = Field(
        default_factory=dict, description="Replace the marker words of a behaviour per language."
    )
    probes: list[Probe] = Field(default_factory=list)
    probes_from: list[ProbeFile] = Field(default_factory=list)
    bias: list[BiasProbe] = Field(default_factory=list)
    associations: list[AssociationProbe] = Field(
        default_factory=list, description="Implicit bias: IAT-style associations (`finetune.evaluation.bias_probes`)."
    )
    decisions: list[DecisionProbe] = Field(
        default_factory=list, description="Implicit bias: relative decisions between candidates of two groups."
    )
    choices: list[ChoiceProbe] = Field(
        default_factory=list, description="Implicit bias: BBQ/CBBQ-style ambiguous/disambiguated multiple choice."
    )
    choices_from: list[ChoiceFile] = Field(default_factory=list, description="`choices:` items from JSONL files.")

    @model_validator(mode="after")
    def _unique_ids(self) -> Suite:
        ids = [p.id for p in self.probes] + [b.id for b in self.bias]
        ids += [p.id for p in (*self.associations, *self.decisions, *self.choices)]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"probe ids must be unique; used twice: {', '.join(twice)}")
        return self


@dataclass
class LoadedSuite:
    """A validated suite, its file, and the `file:line` of each key (for later checks' messages)."""

    suite: Suite
    path: Path
    lines: dict[tuple, str] = field(default_factory=dict)

    def axes(self) -> list[str]:
        """Every axis (category) the suite's bias probes name, in order of first use."""
        suite = self.suite
        names = [p.axis for p in (*suite.bias, *suite.associations, *suite.decisions, *suite.choices)]
        return list(dict.fromkeys(names))

    def has_implicit_bias(self) -> bool:
        """Whether the suite has association, decision or multiple-choice bias probes."""
        return bool(self.suite.associations or self.suite.decisions or self.suite.choices)

    def where(self, *loc: Any) -> str:
        """`file:line` of a key path (or of its nearest ancestor)."""
        for n in range(len(loc), -1, -1):
            if tuple(loc[:n]) in self.lines:
                return self.lines[tuple(loc[:n])]
        return str(self.path)


def load_suite(path: str | Path, limit: int | None = None) -> LoadedSuite:
    """Read and validate a suite (YAML or JSONL); `probes_from` files are read into `probes`."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError([Problem(str(path), "suite file not found")], "cannot read the alignment suite")
    if path.suffix == ".jsonl":
        loaded = LoadedSuite(Suite(name=path.stem, probes=read_probe_file(path)), path)
    else:
        loaded = _load_yaml(path)
        for i, source in enumerate(loaded.suite.probes_from):
            options = source.model_dump(exclude={"path", "limit"})
            file = (path.parent / source.path).resolve()
            if not file.is_file():
                raise ConfigError(
                    [Problem(f"probes_from[{i}].path", f"{file} not found", loaded.where("probes_from", i, "path"))],
                    f"suite {path} has problems",
                )
            loaded.suite.probes += read_probe_file(file, options, source.limit)
        loaded.suite.probes_from = []
        for i, source in enumerate(loaded.suite.choices_from):
            file = (path.parent / source.path).resolve()
            if not file.is_file():
                raise ConfigError(
                    [Problem(f"choices_from[{i}].path", f"{file} not found", loaded.where("choices_from", i, "path"))],
                    f"suite {path} has problems",
                )
            loaded.suite.choices += read_choice_file(file, source.axis, source.limit)
        loaded.suite.choices_from = []
    if limit:
        loaded.suite.probes = loaded.suite.probes[:limit]
    return loaded


def read_probe_file(path: Path, options: dict | None = None, limit: int | None = None) -> list[Probe]:
    """Probes from a JSONL file; unknown fields (CValues' `domain_en`, ...) are kept in `meta`."""
    known = set(Probe.model_fields)
    probes, problems = [], []
    for number, row, where in _json_objects(path, limit, probes, problems, "a `prompt`"):
        record = {**(options or {}), **{k: v for k, v in row.items() if k in known}}
        record.setdefault("id", str(row.get("id_", f"{path.stem}-{number}")))
        record["id"] = str(record["id"])
        record["meta"] = {k: v for k, v in row.items() if k not in known and k != "id_"}
        _validate(Probe, record, probes, problems, path, where)
    if problems:
        raise ConfigError(problems, f"probe file {path} has problems")
    return probes


def read_choice_file(path: Path, axis: str | None = None, limit: int | None = None) -> list[ChoiceProbe]:
    """BBQ/CBBQ-style items from a JSONL file (the keys of `choices:`); every bad line is named."""
    items, problems = [], []
    for number, row, where in _json_objects(path, limit, items, problems, "context, question, options, ..."):
        row = {"id": f"{path.stem}-{number}", **({"axis": axis} if axis else {}), **row}
        row["id"] = str(row["id"])
        _validate(ChoiceProbe, row, items, problems, path, where)
    if problems:
        raise ConfigError(problems, f"multiple-choice file {path} has problems")
    return items


def _json_objects(path: Path, limit: int | None, kept: list, problems: list[Problem], fields: str):
    """(line number, object, `file:line`) of each JSON object line of `path`, until `kept` holds `limit`; a line
    that is not valid JSON, or not an object, goes to `problems` instead."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(kept) >= limit:
            return
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(path.name, f"not valid JSON ({err.msg})", where))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(path.name, f"each line must be a JSON object with {fields}", where))
            continue
        yield number, row, where


def _validate(model: type, record: dict, kept: list, problems: list[Problem], path: Path, where: str) -> None:
    """`model` from `record` into `kept`, or each validation error into `problems` at its field and line."""
    try:
        kept.append(model.model_validate(record))
    except ValidationError as err:
        problems += [
            Problem(_loc(e["loc"]) or path.name, e["msg"].removeprefix("Value error, "), where) for e in err.errors()
        ]


def check_dimensions(
    loaded: LoadedSuite, dimensions: list[str], declared_in: str = "the recipe's reward section"
) -> list[Problem]:
    """Every reward dimension the suite names must exist (`total` always does)."""
    known = [*dimensions, TOTAL]
    problems = []
    for i, probe in enumerate(loaded.suite.probes):
        for name in probe.dimensions or []:
            if name not in known:
                problems.append(
                    _unknown(
                        name,
                        known,
                        f"probes[{i}].dimensions ({probe.id})",
                        loaded.where("probes", i, "dimensions"),
                        declared_in,
                    )
                )
    for i, bias in enumerate(loaded.suite.bias):
        if bias.dimension not in known:
            problems.append(
                _unknown(
                    bias.dimension,
                    known,
                    f"bias[{i}].dimension ({bias.id})",
                    loaded.where("bias", i, "dimension"),
                    declared_in,
                )
            )
    return problems


def uses_reward(loaded: LoadedSuite) -> bool:
    """Whether the suite names reward dimensions explicitly (then it needs a reward model)."""
    return any(p.dimensions for p in loaded.suite.probes) or any(b.dimension != TOTAL for b in loaded.suite.bias)


# --- helpers -------------------------------------------------------------------------------


def _load_yaml(path: Path) -> LoadedSuite:
    import yaml

    try:
        data, lines = read_yaml_lines(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(
            [Problem(path.name, f"not valid YAML: {getattr(err, 'problem', err)}", where)],
            "cannot read the alignment suite",
        ) from None
    wheres = {loc: f"{path}:{line}" for loc, line in lines.items()}
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(path.name, "a suite is a mapping (name:, probes:, bias:, ...)", f"{path}:1")],
            "cannot read the alignment suite",
        )
    data.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message = "unknown key" + _suggest(str(loc[-1]), _allowed_keys(loc[:-1]))
            where = next((wheres[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in wheres), str(path))
            problems.append(Problem(_loc(loc), message, where))
        raise ConfigError(problems, f"suite {path} has problems") from None
    return LoadedSuite(suite, path, wheres)


def _allowed_keys(loc: tuple) -> list[str]:
    section = loc[0] if loc else None
    model = (
        {
            "probes": Probe,
            "probes_from": ProbeFile,
            "bias": BiasProbe,
            "associations": AssociationProbe,
            "decisions": DecisionProbe,
            "choices": ChoiceProbe,
            "choices_from": ChoiceFile,
        }.get(section, Suite)
        if len(loc) >= 2 or not loc
        else Suite
    )
    return sorted(model.model_fields)


def _unknown(name: str, known: list[str], key: str, where: str, declared_in: str) -> Problem:
    message = (
        f"unknown reward dimension {name!r}{_suggest(name, known)} (declared in {declared_in}: {', '.join(known)})"
    )
    return Problem(key, message, where)


def _suggest(name: str, choices: list[str]) -> str:
    guess = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" — did you mean {guess[0]}?" if guess else f"; allowed: {', '.join(choices)}"


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
