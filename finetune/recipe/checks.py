"""Checks across a recipe's sections that need no files and no machine: wiring, datasets, dimensions, options.

`problems(recipe)` runs them all. The checks that read files, installed packages or the machine are the
stages' own `check` functions and the pre-flight (`finetune/checks/`); `config_io.load_recipe` reports
both kinds together, located at their file and line.
"""

from __future__ import annotations

import difflib

from finetune.errors import Problem
from finetune.recipe.options import StageOptions, marked_fields
from finetune.recipe.schema import Recipe
from finetune.recipe.sections import reward_dimensions


def problems(recipe: Recipe) -> list[Problem]:
    """Every problem knowable from the recipe alone, each at its key path."""
    found: list[Problem] = []
    seen: dict[str, int] = {}
    for i, config in enumerate(recipe.stage_configs()):
        name = config.stage_name
        prefix = f"stages[{i}].{config.kind}"
        if name in seen:
            found.append(
                Problem(
                    f"{prefix}.name",
                    f"stage name {name!r} is already used by stages[{seen[name]}]; give each stage a unique `name:`",
                )
            )
        seen.setdefault(name, i)
        if config.kind == "sft" and config.dataset is None and recipe.federated is None:
            found.append(
                Problem(prefix, "an sft stage needs `dataset` (one dataset) or `datasets` (several, mixed by weight)")
            )
        found += dataset_problems(recipe, config, prefix)
        found += stage_dimension_problems(recipe, config, prefix)
        found += [
            Problem(f"{prefix}.{key}", message) for key, message in config.check() + config.check_in_recipe(recipe)
        ]
    found += recipe.data.problems()
    for name, section in recipe.data.items():
        if section.record_format == "tiers" and not section.tier_order:
            found.append(
                Problem(
                    f"data.{name}.tier_order",
                    "a tiers dataset needs `tier_order`: its tier labels, best first "
                    "(e.g. [good, acceptable, harmful])",
                )
            )
    if recipe.model.gguf_file and recipe.model.quantization != "none":
        found.append(
            Problem(
                "model.quantization",
                "a GGUF model is converted to a float model first; "
                "quantize the converted folder instead, or set quantization: none",
            )
        )
    found += [Problem(f"distributed.{key}", message) for key, message in recipe.distributed.check()]
    found += federated_problems(recipe)
    found += wiring(recipe)[1]
    return found


def federated_problems(recipe: Recipe) -> list[Problem]:
    """The `federated` section's own problems, and its links to the stages, datasets and adapter."""
    section = recipe.federated
    if section is None:
        return []
    found = [Problem(f"federated.{key}", message) for key, message in section.check()]
    sft_stages = [c.stage_name for c in recipe.stage_configs() if c.kind == "sft"]
    if section.stage is not None and section.stage not in sft_stages:
        found.append(
            Problem(
                "federated.stage",
                f"{section.stage!r} is not an sft stage of this recipe (sft stages: {', '.join(sft_stages) or 'none'})",
            )
        )
    elif not sft_stages:
        found.append(Problem("federated", "federated training trains the recipe's sft stage on each client; add one"))
    for i, client in enumerate(section.clients):
        if client.dataset is None:
            continue
        if client.dataset not in recipe.data:
            found.append(
                Problem(
                    f"federated.clients[{i}].dataset",
                    f"dataset {client.dataset!r} is not in `data` (defined: {', '.join(recipe.data) or 'none'})",
                )
            )
        elif recipe.data[client.dataset].record_format not in ("chat", "instruction", "text"):
            found.append(
                Problem(
                    f"federated.clients[{i}].dataset",
                    f"dataset {client.dataset!r} has format {recipe.data[client.dataset].record_format!r}; "
                    "clients train the sft stage, which reads chat, instruction or text",
                )
            )
    if recipe.lora.variant == "dora":
        found.append(
            Problem(
                "lora.variant",
                "federated training sends LoRA A/B tensors only, and DoRA also trains magnitude vectors; "
                "use variant lora or rslora",
            )
        )
    return found


def dataset_problems(recipe: Recipe, config: StageOptions, prefix: str) -> list[Problem]:
    """Datasets a stage names that `data` lacks, or whose format the stage does not read."""
    found = []
    for field_name, extra in marked_fields(type(config), "dataset"):
        found += _named_dataset_problems(recipe, config, getattr(config, field_name), f"{prefix}.{field_name}", extra)
    return found


def _named_dataset_problems(
    recipe: Recipe, config: StageOptions, names: object, path: str, extra: dict
) -> list[Problem]:
    """Problems with a dataset field's value: a name, or a mapping of names (`datasets: {a: 0.7, b: 0.3}`)."""
    found: list[Problem] = []
    for value in names if isinstance(names, dict) else [names] if names is not None else []:
        where = f"{path}.{value}" if isinstance(names, dict) else path
        if value not in recipe.data:
            found.append(
                Problem(where, f"dataset {value!r} is not in `data` (defined: {', '.join(recipe.data) or 'none'})")
            )
        elif recipe.data[value].record_format not in extra["dataset"]:
            found.append(
                Problem(
                    where,
                    f"dataset {value!r} has format {recipe.data[value].record_format!r}; "
                    f"a {config.kind} stage reads {' or '.join(extra['dataset'])}",
                )
            )
    return found


def used_datasets(recipe: Recipe) -> list[str]:
    """The datasets the stages read, in stage order, each once (then the federated clients' own datasets)."""
    names = [name for config in recipe.stage_configs() for name in stage_datasets(config)]
    if recipe.federated is not None:
        names += [c.dataset for c in recipe.federated.clients if c.dataset in recipe.data]
    return list(dict.fromkeys(names))


def stage_datasets(config: StageOptions) -> list[str]:
    """The datasets one stage reads (a mapping of datasets counts by its names), each once."""
    values = [getattr(config, f) for f, _ in marked_fields(type(config), "dataset")]
    return list(dict.fromkeys(n for v in values if v for n in (v if isinstance(v, dict) else [v])))


def check_dimension_names(
    recipe: Recipe, names: str | list[str] | dict[str, object] | None, path: str
) -> list[Problem]:
    """Problems for names (a name, a list, or a mapping keyed by name) that the `reward` section does not declare."""
    if names is None:
        return []
    wanted = [names] if isinstance(names, str) else list(names)
    declared = [d.name for d in reward_dimensions(recipe)]
    found = []
    for name in wanted:
        if name in declared or name == "total":
            continue
        guess = difflib.get_close_matches(str(name), declared, n=1, cutoff=0.6)
        hint = f"did you mean {guess[0]}? " if guess else ""
        where = (
            "the recipe's `reward` section declares"
            if recipe.reward
            else "no `reward` section, so the only dimension is"
        )
        found.append(Problem(path, f"unknown reward dimension {name!r}; {hint}{where}: {', '.join(declared)}"))
    return found


def stage_dimension_problems(recipe: Recipe, config: StageOptions, prefix: str) -> list[Problem]:
    """Unknown reward dimensions in a stage's fields made with `dimension_field` (rlhf weights, gates...)."""
    found: list[Problem] = []
    for field_name, _ in marked_fields(type(config), "dimensions"):
        found += check_dimension_names(recipe, getattr(config, field_name), f"{prefix}.{field_name}")
    return found


def wiring(recipe: Recipe) -> tuple[dict[str, dict[str, str]], list[Problem]]:
    """Resolve each stage's inputs to earlier stage names: explicit names, or the latest producer."""
    resolved: dict[str, dict[str, str]] = {}
    found: list[Problem] = []
    earlier: list[StageOptions] = []
    for i, config in enumerate(recipe.stage_configs()):
        inputs: dict[str, str] = {}
        for field_name, extra in marked_fields(type(config), "input"):
            kinds = extra["input"] if isinstance(extra["input"], list) else [extra["input"]]
            output = " or ".join(kinds)
            path = f"stages[{i}].{config.kind}.{field_name}"
            wanted = getattr(config, field_name)
            producers = [c.stage_name for c in earlier if set(kinds) & set(c.produces)]
            if wanted in extra.get("special", ()):  # a value that names no stage, e.g. `base`
                continue
            if wanted is None:
                if producers:
                    inputs[field_name] = producers[-1]
                elif field_name not in config.optional_inputs:
                    other = "".join(f", or set `{field_name}: {s}`" for s in extra.get("special", ()))
                    found.append(
                        Problem(
                            path,
                            f"needs an earlier stage that produces {_article(output)} {output}, and there is none; "
                            f"add one before this stage or name one with `{field_name}:`{other}",
                        )
                    )
            elif wanted in producers:
                inputs[field_name] = wanted
            else:
                later = [c.stage_name for c in recipe.stage_configs()[i:]]
                why = "comes later (stages read only earlier stages)" if wanted in later else "is not a stage name"
                choices = ", ".join(producers) or "none"
                found.append(
                    Problem(path, f"{wanted!r} {why}; earlier stages producing {_article(output)} {output}: {choices}")
                )
        resolved[config.stage_name] = inputs
        earlier.append(config)
    return resolved, found


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"
