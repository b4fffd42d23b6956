"""Values that came from `${env:VAR}`: the run uses them, and nothing writes them.

`config_io` expands `${env:VAR}` while it loads a recipe and calls `mark_secrets` with where each expanded value
sits: the section that holds it remembers the field's name (`from_env`), the `Recipe` remembers value ->
reference. Only `recipe.yaml` is written from the references (`LoadedRecipe.to_yaml`). Everything else that could
carry a value into the run folder or a message goes through one of these:

- the builders that hand values to libraries which save them on their own: the trainer's `run_name`
  (`public_run_name`: the run folder's name instead; it lands in `training_args.bin` and the dashboards) and the
  model's `name_or_path` (`public_model_name`: "base-model"; PEFT copies it into every `adapter_config.json`);
- the writers of text and JSON (lineage.json, hence report.html; validation errors): `redact` and `redact_data`
  put the `${env:VAR}` reference back in place of each value.

A value shorter than `MIN_REDACTED` characters is not searched for in text: replacing every `2` of a file because
`max_steps: ${env:STEPS}` gave 2 would garble it, and such a value gives nothing away.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel

MIN_REDACTED = 4
NEUTRAL_MODEL_NAME = "base-model"
_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def mark_secrets(recipe: Any, references: dict[tuple, str]) -> None:
    """Record on `recipe` that the value at each key path came from its `${env:...}` reference (text as written)."""
    pairs = []
    for loc, reference in references.items():
        holder, name, value = _holder(recipe, loc)
        if holder is not None and hasattr(holder, "_from_env"):
            holder._from_env = holder._from_env | {name}
        pairs.append((reference, value))
    recipe._env_values = env_values(pairs)


def env_values(pairs: list[tuple[str, Any]]) -> dict[str, str]:
    """value -> reference, for each (`${env:...}` text as written, expanded value) and each variable in it."""
    values: dict[str, str] = {}
    for reference, value in pairs:
        for var in _ENV_REF.findall(str(reference)):
            values[os.environ.get(var, "")] = f"${{env:{var}}}"
        if isinstance(value, str):
            values[value] = str(reference)
    return {value: reference for value, reference in values.items() if len(value) >= MIN_REDACTED}


def from_env(section: BaseModel, name: str) -> bool:
    """Whether the field `name` of `section` came from `${env:...}` (so its value must not be written)."""
    return name in getattr(section, "_from_env", ())


def public_run_name(recipe: Any, run_folder_name: str) -> str:
    """The dashboard / trainer run name: `tracking.run_name`, or the run folder's name when unset or a secret."""
    tracking = recipe.tracking
    return run_folder_name if not tracking.run_name or from_env(tracking, "run_name") else tracking.run_name


def public_model_name(section: Any) -> str:
    """What a saved model or adapter may call its base: `model.path`, or a neutral name when it is a secret."""
    return NEUTRAL_MODEL_NAME if from_env(section, "path") else section.path


def redact(text: str, secrets: dict[str, str]) -> str:
    """`text` with every secret value (`secrets_of(recipe)`, `env_values`) replaced by its `${env:...}` reference."""
    for value in sorted(secrets, key=len, reverse=True):  # a longer value may contain a shorter one
        text = text.replace(value, secrets[value])
    return text


def redact_data(data: Any, secrets: dict[str, str]) -> Any:
    """`redact` applied to every string (keys too) of JSON-like data."""
    if isinstance(data, str):
        return redact(data, secrets)
    if isinstance(data, dict):
        return {redact_data(k, secrets): redact_data(v, secrets) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact_data(v, secrets) for v in data]
    return data


def secrets_of(recipe: Any) -> dict[str, str]:
    """Each value of `recipe` that came from `${env:...}` -> its reference."""
    return dict(getattr(recipe, "_env_values", {}))


def _holder(recipe: Any, loc: tuple) -> tuple[BaseModel | None, str, Any]:
    """The deepest pydantic model on the way to `loc`, the field of it the path goes through, and the value."""
    holder, name, node = None, "", recipe
    for key in loc:
        if isinstance(node, BaseModel):
            holder, name = node, str(key)
            node = getattr(node, str(key), None)
        elif isinstance(node, dict | list):
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return holder, name, None
        else:
            return holder, name, None
    return holder, name, node
