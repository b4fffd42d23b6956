"""The values the installed TRL accepts for a config field, read from TRL's own field documentation.

`wenmai validate` checks names like `loss_type` against the installed TRL before any training starts. Importing
a TRL config pulls in transformers (seconds), so the config's source file is read instead: its dataclass
field's `choices` metadata, else the quoted names in its `help` text (DPOConfig lists its losses there).
When the file cannot be read that way, the config class is imported and read the same way.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

CONFIGS = {  # trainer -> (module, config class)
    "dpo": ("trl.trainer.dpo_config", "DPOConfig"),
    "kto": ("trl.trainer.kto_config", "KTOConfig"),
}
_QUOTED = re.compile(r"`'([a-z0-9_]+)'`")


def loss_types(trainer: str) -> list[str]:
    """The `loss_type` names the installed TRL accepts for `trainer` (dpo, kto)."""
    module, cls = CONFIGS[trainer]
    return list(field_choices(module, cls, "loss_type"))


@cache
def field_choices(module: str, cls: str, field: str) -> tuple[str, ...]:
    """The documented choices of `cls.field` in `module`, from its source, else by importing it."""
    metadata = _metadata_from_source(module, cls, field)
    if metadata is None:
        metadata = _metadata_from_import(module, cls, field)
    return _choices(metadata)


def _choices(metadata: dict) -> tuple[str, ...]:
    if metadata.get("choices"):
        return tuple(metadata["choices"])
    return tuple(dict.fromkeys(_QUOTED.findall(metadata.get("help", ""))))


def _metadata_from_source(module: str, cls: str, field: str) -> dict | None:
    try:
        package = importlib.util.find_spec(module.split(".")[0])
        if package is None or not package.submodule_search_locations:
            return None
        path = Path(next(iter(package.submodule_search_locations)), *module.split(".")[1:]).with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if (
                    isinstance(item, ast.AnnAssign)
                    and getattr(item.target, "id", None) == field
                    and isinstance(item.value, ast.Call)
                ):
                    for keyword in item.value.keywords:
                        if keyword.arg == "metadata":
                            try:
                                value = ast.literal_eval(keyword.value)
                            except ValueError:
                                return None
                            return value if _choices(value) else None
    return None


def _metadata_from_import(module: str, cls: str, field: str) -> dict:
    import dataclasses
    import importlib

    config = getattr(importlib.import_module(module), cls)
    return dict(next(f for f in dataclasses.fields(config) if f.name == field).metadata)
