"""Files the recipe's data policy names (topic list, name list, evaluation sets to check against) exist."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import Problem
from finetune.recipe import Recipe


def data_policy_problems(recipe: Recipe) -> list[Problem]:
    """A problem at `data.policy.<key>` for each file the policy names that is not there."""
    return [
        Problem(f"data.policy.{key}", f"{path} not found")
        for key, path in recipe.data.policy_files()
        if not Path(path).exists()
    ]
