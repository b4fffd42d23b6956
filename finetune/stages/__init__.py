"""The stage registry: a stage kind is a name mapped to the module holding its method.

Every stage module reads top to bottom as its whole method and provides the same three functions:
- `run(ctx: StageContext) -> StageResult`: do the work, write into the stage folder, return the outputs;
- `check(options, recipe) -> list[(field, message)]`: what needs files or installed packages to know
  (`wenmai validate` and `wenmai run` report it with the recipe's own problems, at file:line);
- `machine_problems(options) -> list[str]`: what this machine lacks for the options (pre-flight: an error
  for `wenmai run`, a warning for `wenmai validate`).
The options of each kind are in `finetune.recipe` (`OPTIONS`, the same kinds).
"""

from __future__ import annotations

from finetune.errors import Problem
from finetune.recipe import Recipe
from finetune.stages import debias, evaluate, export, merge, preference, reward, rlhf, sft

STAGES = {
    "sft": sft,
    "reward": reward,
    "dpo": preference,
    "kto": preference,
    "orpo": preference,
    "rlhf": rlhf,
    "debias": debias,
    "evaluate": evaluate,
    "merge": merge,
    "export": export,
}


def stage_problems(recipe: Recipe) -> list[Problem]:
    """Every stage's own file and package checks, each at `stages[i].<kind>.<field>`."""
    found = []
    for i, options in enumerate(recipe.stage_configs()):
        found += [
            Problem(f"stages[{i}].{options.kind}.{key}", message)
            for key, message in STAGES[options.kind].check(options, recipe)
        ]
    return found


def machine_problems(recipe: Recipe) -> list[str]:
    """What this machine lacks for each stage's options."""
    return [p for options in recipe.stage_configs() for p in STAGES[options.kind].machine_problems(options)]
