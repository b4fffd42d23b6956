"""Rule-based rewards for the `rlhf` stage: answer length, a required format, and an institution's banned terms.

Each rule is a reward function in the shape TRL's GRPOTrainer calls (`prompts`, `completions` -> one float
each) and is named after the rule (`rule_length`, `rule_format`, `rule_banned_terms`), so TRL logs
`rewards/rule_<name>/mean` next to the reward model's dimensions. The options are the recipe's
`stages[i].rlhf.rules` section (`finetune.recipe.rlhf.RuleRewards`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from finetune.errors import WenmaiError
from finetune.recipe.rlhf import LengthRule, RuleRewards

RewardFunction = Callable[..., list[float]]


def rule_functions(rules: RuleRewards) -> list[tuple[RewardFunction, float]]:
    """(reward function, weight) for every rule set, in a fixed order."""
    functions: list[tuple[RewardFunction, float]] = []
    if rules.length is not None:
        functions.append((_named("rule_length", _length(rules.length)), rules.length.weight))
    if rules.format is not None:
        functions.append((_named("rule_format", _format(rules.format.pattern)), rules.format.weight))
    if rules.banned_terms is not None:
        pattern = banned_pattern(read_banned_terms(rules.banned_terms.path))
        functions.append((_named("rule_banned_terms", _banned(pattern)), rules.banned_terms.weight))
    return functions


def read_banned_terms(path: str | Path) -> list[str]:
    """The terms of a banned-term file (one a line, `#` comments and blank lines ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise WenmaiError(f"banned terms: cannot read {path}: {err}") from None
    terms = [line.split("#", 1)[0].strip() for line in lines]
    terms = [t for t in terms if t]
    if not terms:
        raise WenmaiError(f"banned terms: {path} lists no terms (one a line; `#` starts a comment)")
    return terms


def banned_pattern(terms: list[str]) -> re.Pattern:
    """One case-insensitive pattern: Latin words on word boundaries (so `ass` does not match `class`), other terms anywhere."""
    parts = [
        rf"\b{re.escape(t)}\b" if re.fullmatch(r"[A-Za-z0-9' -]+", t) else re.escape(t)
        for t in sorted(set(terms), key=len, reverse=True)
    ]
    return re.compile("|".join(parts), re.IGNORECASE)


def completion_text(completion: str | list[dict]) -> str:
    """The answer text of a completion: plain text, or the content of TRL's conversational completion messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


# --- helpers ---------------------------------------------------------------------------------


class _named:
    """A reward function with a `__name__`, which TRL uses in the logged metric names."""

    def __init__(self, name: str, score: Callable[[str], float]):
        self.__name__ = name
        self._score = score

    def __call__(self, prompts: list, completions: list, **_: object) -> list[float]:
        return [self._score(completion_text(c)) for c in completions]


def _length(rule: LengthRule) -> Callable[[str], float]:
    def score(text: str) -> float:
        n = len(text.strip())
        if n < rule.min_chars:
            return -min(1.0, (rule.min_chars - n) / rule.min_chars)
        if rule.max_chars is not None and n > rule.max_chars:
            return -min(1.0, (n - rule.max_chars) / rule.max_chars)
        return 0.0

    return score


def _format(pattern: str) -> Callable[[str], float]:
    compiled = re.compile(pattern)
    return lambda text: 1.0 if compiled.search(text) else 0.0


def _banned(pattern: re.Pattern) -> Callable[[str], float]:
    return lambda text: -1.0 if pattern.search(text) else 0.0
