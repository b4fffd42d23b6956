"""`--set a.b.c=value`: one override applied to a recipe's merged data, its origin recorded as `--set`.

A stage item `{kind: {...}}` of `stages:` may be addressed by its name: `stages.sft.max_steps=5`.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune.errors import Problem
from finetune.yaml_lines import Origin, format_loc, parse_loc


def apply_override(data: dict, origins: dict, text: str, problems: list[Problem]) -> None:
    if "=" not in text:
        problems.append(Problem(text, "an override looks like KEY=VALUE, e.g. --set stages.sft.max_steps=5", "--set"))
        return
    dotted, value_text = text.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    parts = parse_loc(dotted.strip())
    container: Any = data
    loc: list = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(container, list):
            index = _list_index(container, part)
            if index is None:
                names = ", ".join(_item_names(container)) or "none"
                problems.append(
                    Problem(dotted, f"no item {part!r} in {format_loc(tuple(loc))} (items: {names})", "--set")
                )
                return
            loc.append(index)
            item = container[index]
            if last:
                container[index] = value
                break
            if isinstance(part, str) and _is_stage_item(item):
                # a stage item `{sft: {...}}` addressed by name: stages.sft.max_steps
                kind = next(iter(item))
                loc.append(kind)
                container = item[kind]
            else:
                container = item
            continue
        if not isinstance(container, dict):
            problems.append(
                Problem(
                    dotted, f"{format_loc(tuple(loc))} is a value, not a section; cannot set a key inside it", "--set"
                )
            )
            return
        loc.append(part)
        if last:
            container[part] = value
        else:
            if not isinstance(container.get(part), dict | list):
                container[part] = {}
            container = container[part]
    here = tuple(loc)
    for k in [k for k in origins if k[: len(here)] == here]:
        del origins[k]
    origins[here] = Origin("--set")


def _list_index(items: list, part: Any) -> int | None:
    if isinstance(part, int):
        return part if -len(items) <= part < len(items) else None
    matches = [i for i, item in enumerate(items) if _is_stage_item(item) and _stage_item_name(item) == part]
    return matches[0] if len(matches) == 1 else None


def _is_stage_item(item: Any) -> bool:
    return isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), dict | None)


def _stage_item_name(item: dict) -> str:
    kind, body = next(iter(item.items()))
    return (body or {}).get("name") or kind


def _item_names(items: list) -> list[str]:
    return [_stage_item_name(it) if _is_stage_item(it) else str(i) for i, it in enumerate(items)]
