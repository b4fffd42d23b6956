"""Reading recipes: YAML with line numbers, `include:` merging, `--set` overrides, `${env:VAR}`, errors.

The result of `load_recipe` is a validated `Recipe` plus where every value came from (file:line, a
fragment, `--set`, or the schema default), so that errors and `wenmai validate` can say so. It runs the
recipe's own checks (`finetune.recipe.checks`); callers that can also read files and installed packages
pass their checks in (`finetune.pipeline.load_recipe` does), and every problem is reported together.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune.errors import ConfigError, Problem
from finetune.overrides import apply_override
from finetune.recipe import OPTIONS, Recipe, SpeedOptions
from finetune.recipe import problems as recipe_problems
from finetune.recipe.fields import field_at, model_at
from finetune.recipe.secrets import env_values, mark_secrets, redact
from finetune.run_dir import RunDir
from finetune.yaml_lines import (
    Loc,
    Origin,
    display_path,
    format_loc,
    parse_loc,
    read_yaml,
)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
Check = Callable[[Recipe], list[Problem]]  # problems a caller finds in a valid recipe, at key paths


@dataclass
class LoadedRecipe:
    """A validated recipe, the file it came from, and the origin of each value."""

    recipe: Recipe
    path: Path
    origins: dict[Loc, Origin]
    secret_paths: set[Loc] = field(default_factory=set)
    raw: dict = field(default_factory=dict)  # merged, before `${env:...}` expansion
    checked: bool = False  # the caller's checks (files, installed packages) ran too

    def origin(self, loc: Loc) -> Origin:
        """The origin of `loc`, or of its nearest ancestor that has one."""
        for n in range(len(loc), -1, -1):
            if tuple(loc[:n]) in self.origins:
                return self.origins[tuple(loc[:n])]
        return Origin("default")

    def locate(self, problem: Problem) -> Problem:
        """`problem` with the file:line (or fragment, `--set`, default) of the key it names."""
        return Problem(problem.path, problem.message, str(self.origin(parse_loc(problem.path))))

    def to_yaml(self, annotate: bool = False) -> str:
        """The resolved recipe as YAML; secrets keep their `${env:...}` reference, never the value."""
        data = self.recipe.model_dump(mode="json", exclude_none=False)
        for loc in self.secret_paths:
            _set_at(data, loc, _get_at(self.raw, loc))
        if not annotate:
            return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        return "\n".join(_annotated_lines(data, (), self, 0)) + "\n"


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), checks: Sequence[Check] = ()
) -> LoadedRecipe:
    """Read, merge, override and validate a recipe; raise `ConfigError` listing every problem.

    `checks` add problems found outside the schema (files, installed packages), located like the others.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem(str(path), "recipe file not found; check the path")], "cannot read the recipe")
    problems: list[Problem] = []
    data, origins = _load_with_includes(path.resolve(), "recipe", [], problems)
    for override in overrides:
        apply_override(data, origins, override, problems)
    if problems:
        raise ConfigError(problems)
    _resolve_paths(data, origins)
    raw = copy.deepcopy(data)
    secret_paths = _expand_env(data, (), origins, problems)
    secrets = env_values([(_get_at(raw, loc), _get_at(data, loc)) for loc in secret_paths])
    try:
        return _validated(data, path, origins, secret_paths, raw, problems, checks)
    except ConfigError as err:  # a message shows a secret's `${env:...}` reference, never its value
        redacted = [Problem(p.path, redact(p.message, secrets), p.where) for p in err.problems]
        raise ConfigError(redacted, redact(err.title, secrets)) from None


def _validated(
    data: dict,
    path: Path,
    origins: dict[Loc, Origin],
    secret_paths: set[Loc],
    raw: dict,
    problems: list[Problem],
    checks: Sequence[Check],
) -> LoadedRecipe:
    problems += _number_problems(data, origins)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems += [_problem_from_pydantic(e, origins) for e in err.errors()]
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    mark_secrets(recipe, {loc: _get_at(raw, loc) for loc in secret_paths})
    loaded = LoadedRecipe(recipe, path.resolve(), origins, secret_paths, raw)
    found = recipe_problems(recipe) + [p for check in checks for p in check(recipe)]
    problems += [loaded.locate(p) for p in found]
    if problems:
        raise ConfigError(problems)
    loaded.checked = bool(checks)
    return loaded


def load_resolved(text: str, path: Path) -> LoadedRecipe:
    """Validate an already-resolved recipe (the copy stored in a run folder)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{display_path(path)}:{mark.line + 1}" if mark else display_path(path)
        raise ConfigError(
            [Problem(display_path(path), f"damaged: not valid YAML ({getattr(err, 'problem', err)})", where)],
            f"cannot read the run's recipe {path}; restore it from a copy, or start a new run",
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(display_path(path), "damaged: not a recipe (a mapping of sections)", f"{display_path(path)}:1")],
            f"cannot read the run's recipe {path}; restore it from a copy, or start a new run",
        )
    data = _without_refused_speed_defaults(data)
    problems: list[Problem] = []
    origins = {(): Origin("recipe", str(path), 1)}
    secret_paths = _expand_env(data, (), origins, problems)
    if problems:
        raise ConfigError(problems, f"cannot resume from {path}")
    raw = yaml.safe_load(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        secrets = env_values([(_get_at(raw, loc), _get_at(data, loc)) for loc in secret_paths])
        found = [_problem_from_pydantic(e, origins) for e in err.errors()]
        redacted = [Problem(p.path, redact(p.message, secrets), p.where) for p in found]
        raise ConfigError(redacted, f"{path} is not a valid recipe") from None
    mark_secrets(recipe, {loc: _get_at(raw, loc) for loc in secret_paths})
    return LoadedRecipe(recipe, path, origins, secret_paths, raw)


def _without_refused_speed_defaults(data: Any) -> Any:
    """Run folders written before the schema moved `speed:` to the stages that run a speed plan list it, at its
    defaults, under every trainer stage; those copies asked for nothing and are dropped so the runs still load."""
    defaults = SpeedOptions().model_dump(mode="json")
    stages = data.get("stages") if isinstance(data, dict) else None
    for item in stages if isinstance(stages, list) else []:
        for kind, options in item.items() if isinstance(item, dict) else []:
            refuses = kind in OPTIONS and "speed" not in OPTIONS[kind].model_fields
            if refuses and isinstance(options, dict) and options.get("speed") == defaults:
                del options["speed"]
    return data


def load_run_recipe(run_dir: RunDir) -> LoadedRecipe:
    """The resolved recipe a run was started with (its `recipe.yaml`)."""
    return load_resolved(run_dir.recipe_path.read_text(encoding="utf-8"), run_dir.recipe_path)


# --- include: ------------------------------------------------------------------------------


def _load_with_includes(path: Path, kind: str, stack: list[Path], problems: list[Problem]) -> tuple[dict, dict]:
    if path in stack:
        cycle = " -> ".join(os.path.relpath(p, stack[0].parent) for p in [*stack, path])
        problems.append(
            Problem("include", f"include cycle: {cycle}; remove one of these includes", display_path(stack[-1]))
        )
        return {}, {}
    data, origins = read_yaml(path, kind, problems)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        problems.append(
            Problem("include", "must be a list of fragment paths or names", str(origins.get(("include",), "")))
        )
        includes = []
    merged: dict = {}
    merged_origins: dict[Loc, Origin] = {}
    for i, name in enumerate(includes):
        where = origins.get(("include", i), origins.get(("include",)))
        target = _find_include(str(name), path.parent)
        if target is None:
            problems.append(
                Problem(
                    f"include[{i}]",
                    f"fragment {name!r} not found; give a path relative to {display_path(path.parent)} "
                    f"or a name under configs/ such as 'models/smollm2-135m' (available: {', '.join(_available_fragments()) or 'none'})",
                    str(where) if where else None,
                )
            )
            continue
        frag, frag_origins = _load_with_includes(target, "fragment", [*stack, path], problems)
        _deep_merge(merged, merged_origins, frag, frag_origins, ())
    origins = {k: v for k, v in origins.items() if not (k and k[0] == "include")}
    _deep_merge(merged, merged_origins, data, origins, ())
    merged_origins.setdefault((), origins.get(()))
    return merged, merged_origins


def _find_include(name: str, base_dir: Path) -> Path | None:
    candidates = [base_dir / name, CONFIGS_DIR / name]
    candidates += [c.with_name(c.name + ext) for c in list(candidates) for ext in (".yaml", ".yml")]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def _available_fragments() -> list[str]:
    if not CONFIGS_DIR.is_dir():
        return []
    return sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml"))


def _deep_merge(base: dict, base_origins: dict, top: dict, top_origins: dict, loc: Loc) -> None:
    """Merge `top` into `base` in place; mappings merge key by key, anything else is replaced."""
    for key, value in top.items():
        here = (*loc, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], base_origins, value, top_origins, here)
            if here in top_origins:
                base_origins[here] = top_origins[here]
            continue
        base[key] = copy.deepcopy(value)
        for k in [k for k in base_origins if k[: len(here)] == here]:
            del base_origins[k]
        base_origins.update({k: v for k, v in top_origins.items() if k[: len(here)] == here})


# --- paths and ${env:VAR} --------------------------------------------------------------------


def _number_problems(data: Any, origins: dict, loc: Loc = ()) -> list[Problem]:
    """Values pydantic would take but the run could not: yes/no where a number goes (`seq_len: true` becomes 1),
    and infinities or NaN (saved as null in JSON, so every later resume, merge or export of the run fails)."""
    found: list[Problem] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _number_problems(value, origins, (*loc, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _number_problems(value, origins, (*loc, i))
    elif isinstance(data, bool | float):
        info = field_at(loc)
        kinds = _scalar_types(info.annotation) if info is not None else set()
        where = origins.get(loc) or _nearest(origins, loc)
        if isinstance(data, bool) and bool not in kinds and kinds & {int, float}:
            found.append(Problem(format_loc(loc), f"{str(data).lower()} is a yes/no value; give a number", str(where)))
        elif isinstance(data, float) and not math.isfinite(data) and float in kinds:
            found.append(Problem(format_loc(loc), f"{data} is not a finite number; give one", str(where)))
    return found


def _scalar_types(annotation: Any) -> set[type]:
    """The plain types an annotation accepts (through Optional, unions and Annotated)."""
    if isinstance(annotation, type):
        return {annotation}
    out: set[type] = set()
    for arg in typing.get_args(annotation):
        out |= _scalar_types(arg)
    return out


def _resolve_paths(data: Any, origins: dict, loc: Loc = ()) -> None:
    """Make relative paths in path-typed fields absolute, against the file that set them."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = (*loc, key)
            info = field_at(here)
            extra = (info.json_schema_extra or {}) if info is not None else {}
            if isinstance(value, str) and extra.get("is_path") and not _ENV_REF.search(value):
                data[key] = _resolve_one(value, origins.get(here) or _nearest(origins, here), extra.get("is_path"))
            elif isinstance(value, list) and extra.get("is_path"):  # a list of paths
                data[key] = [
                    _resolve_one(v, origins.get((*here, i)) or _nearest(origins, here), extra.get("is_path"))
                    if isinstance(v, str) and not _ENV_REF.search(v)
                    else v
                    for i, v in enumerate(value)
                ]
            else:
                _resolve_paths(value, origins, here)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _resolve_paths(value, origins, (*loc, i))


def _resolve_one(value: str, origin: Origin | None, mode: Any) -> str:
    if "://" in value or value.startswith("pkg:"):
        return value
    expanded = Path(value).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    base = Path(origin.file).parent if origin and origin.file else Path.cwd()
    candidate = (base / expanded).resolve()
    # a model path may also be a hub id ("org/name"): keep it unless it looks like or is a local path
    if mode == "maybe" and not (value.startswith((".", "~")) or candidate.exists()):
        return value
    return str(candidate)


def _nearest(origins: dict, loc: Loc) -> Origin | None:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in origins:
            return origins[tuple(loc[:n])]
    return None


def _expand_env(data: Any, loc: Loc, origins: dict, problems: list[Problem]) -> set[Loc]:
    secrets: set[Loc] = set()
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in list(items):
        here = (*loc, key)
        if isinstance(value, str) and _ENV_REF.search(value):
            missing = [m for m in _ENV_REF.findall(value) if m not in os.environ]
            if missing:
                problems.append(
                    Problem(
                        format_loc(here),
                        f"environment variable {missing[0]} is not set; export it before running",
                        str(_nearest(origins, here) or ""),
                    )
                )
                continue
            data[key] = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)
            secrets.add(here)
        elif isinstance(value, dict | list):
            secrets |= _expand_env(value, here, origins, problems)
    return secrets


# --- schema walking and error messages --------------------------------------------------------


def _problem_from_pydantic(error: dict, origins: dict) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    where = _nearest(origins, loc)
    where_text = str(where) if where else None
    if kind == "extra_forbidden":
        parent = model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        what = (
            "unknown stage kind" if parent is not None and getattr(parent, "__stage_entry__", False) else "unknown key"
        )
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f" — did you mean {guess[0]}?" if guess else f"; allowed: {', '.join(allowed)}"
        return Problem(format_loc(loc), f"{what}{hint}", where_text)
    if kind == "missing":
        return Problem(format_loc(loc), "required key is missing", where_text)
    message = error["msg"].removeprefix("Value error, ")
    if (
        kind not in ("value_error", "assertion_error")
        and "input" in error
        and not isinstance(error["input"], dict | list)
    ):
        message += f" (got {error['input']!r})"
    return Problem(format_loc(loc), message, where_text)


def _get_at(data: Any, loc: Loc) -> Any:
    for key in loc:
        data = data[key]
    return data


def _set_at(data: Any, loc: Loc, value: Any) -> None:
    try:
        parent = _get_at(data, loc[:-1])
        parent[loc[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


def _annotated_lines(data: Any, loc: Loc, loaded: LoadedRecipe, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        here = (*loc, key)
        label = f"{pad}{key}:" if isinstance(data, dict) else f"{pad}-"
        origin = loaded.origins.get(here) or Origin("default")
        if isinstance(data, list) and isinstance(value, dict) and value:
            inner = _annotated_lines(value, here, loaded, indent + 1)
            lines += [f"{pad}- {inner[0].lstrip()}", *inner[1:]]
        elif (
            isinstance(value, dict)
            and value
            or isinstance(value, list)
            and value
            and any(isinstance(v, dict | list) for v in value)
        ):
            lines.append(label)
            lines += _annotated_lines(value, here, loaded, indent + 1)
        else:
            scalar = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
            scalar = scalar.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{label} {scalar}  # {origin}")
    return lines
