"""User errors: what went wrong, where (key, file:line), what is allowed, and what to do."""

from __future__ import annotations

from dataclasses import dataclass


class WenmaiError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""


@dataclass(frozen=True)
class Problem:
    """One problem in a recipe or data file, located as precisely as we can."""

    path: str  # dotted key path (`stages[0].sft.learning_rate`) or a file name
    message: str
    where: str | None = None  # `file:line`, `--set`, or `default`

    def __str__(self) -> str:
        suffix = f"  ({self.where})" if self.where else ""
        return f"{self.path}: {self.message}{suffix}"


class ConfigError(WenmaiError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, problems: list[Problem], title: str = "the recipe has problems"):
        self.problems = problems
        self.title = title
        count = len(problems)
        lines = [f"{title} ({count} problem{'s' if count != 1 else ''}):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(WenmaiError):
    """Bad records in a data file, each named by file:line."""
