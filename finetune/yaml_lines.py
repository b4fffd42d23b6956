"""YAML with line numbers, and the key paths that name a place in it: `stages[0].sft.learning_rate`.

Recipes, fragments and alignment suites are read here, so every error can say file:line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import Problem

Loc = tuple  # a key path: ("stages", 0, "sft", "learning_rate")


@dataclass(frozen=True)
class Origin:
    """Where a value came from."""

    kind: str  # "recipe", "fragment", "--set" or "default"
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.file is None:
            return self.kind
        where = f"{display_path(self.file)}:{self.line}"
        return f"{where} (fragment)" if self.kind == "fragment" else where


def read_yaml_lines(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Any YAML file's data and the line of each key and list item (for suites and other YAML inputs).

    Raises `yaml.YAMLError` (with a `problem_mark`) or `OSError`; the caller words the error.
    """
    loader = yaml.SafeLoader(Path(path).read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    origins: dict[Loc, Origin] = {}
    if node is not None:
        record_lines(node, (), str(path), "file", origins)
    return data, {loc: origin.line for loc, origin in origins.items()}


def read_yaml(path: Path, kind: str, problems: list[Problem]) -> tuple[dict, dict[Loc, Origin]]:
    try:
        text = path.read_text(encoding="utf-8")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{display_path(path)}:{mark.line + 1}" if mark else display_path(path)
        problems.append(Problem(display_path(path), f"not valid YAML: {getattr(err, 'problem', err)}", where))
        return {}, {}
    except (OSError, UnicodeDecodeError) as err:
        problems.append(Problem(display_path(path), f"cannot read file: {err}"))
        return {}, {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(
            Problem(
                display_path(path),
                "a recipe must be a mapping of sections (model:, data:, stages:, ...)",
                f"{display_path(path)}:1",
            )
        )
        return {}, {}
    problems += duplicate_keys(node, (), str(path))
    origins: dict[Loc, Origin] = {(): Origin(kind, str(path), 1)}
    record_lines(node, (), str(path), kind, origins)
    return data, origins


def duplicate_keys(node: yaml.Node | None, loc: Loc, file: str) -> list[Problem]:
    """A key given twice in one mapping: YAML keeps the last one silently, so the first would be lost unseen."""
    found: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in seen and key != "<<":
                found.append(
                    Problem(
                        format_loc((*loc, key)),
                        f"given twice (lines {seen[key]} and {line}); YAML would keep only the second: remove one",
                        f"{display_path(file)}:{line}",
                    )
                )
            seen.setdefault(key, line)
            found += duplicate_keys(value_node, (*loc, key), file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += duplicate_keys(item, (*loc, i), file)
    return found


def record_lines(node: yaml.Node, loc: Loc, file: str, kind: str, origins: dict[Loc, Origin]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            if key == "<<":
                continue
            origins[(*loc, key)] = Origin(kind, file, key_node.start_mark.line + 1)
            record_lines(value_node, (*loc, key), file, kind, origins)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            origins[(*loc, i)] = Origin(kind, file, item.start_mark.line + 1)
            record_lines(item, (*loc, i), file, kind, origins)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


def parse_loc(text: str) -> Loc:
    """`stages[0].sft.lr` or `stages.0.sft.lr` -> ("stages", 0, "sft", "lr")."""
    parts: list = []
    for piece in re.findall(r"[^.\[\]]+", text):
        parts.append(int(piece) if piece.lstrip("-").isdigit() else piece)
    return tuple(parts)


def display_path(path: str | Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
