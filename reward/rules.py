"""Rule-based rewards for the `rlhf` stage: answer length, a required format, and an institution's banned terms.

Each rule is a reward function in the shape TRL's GRPOTrainer calls (`prompts`, `completions` -> one float
each) and is named after the rule (`rule_length`, `rule_format`, `rule_banned_terms`), so TRL logs
`rewards/rule_<name>/mean` next to the reward model's dimensions. The options are the recipe's
`stages[i].rlhf.rules` section; only pydantic and `re` are imported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.errors import WenmaiError


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LengthRule(_Rule):
    """Answers between min_chars and max_chars get 0; outside, they lose up to 1 in proportion to how far off they are."""

    min_chars: int = Field(0, ge=0, description="Shortest answer, in characters, that loses nothing.")
    max_chars: int | None = Field(None, gt=0, description="Longest answer, in characters, that loses nothing (none: no upper bound).")
    weight: float = Field(0.5, ge=0, description="Weight of this rule in the reward.")

    @model_validator(mode="after")
    def _ordered(self) -> LengthRule:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class FormatRule(_Rule):
    """Answers matching a regular expression (anywhere in the answer) get 1, others 0."""

    pattern: str = Field(..., min_length=1, description="Python regular expression the answer should contain (e.g. `出处[:：]`).")
    weight: float = Field(0.5, ge=0, description="Weight of this rule in the reward.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return pattern


class BannedTermsRule(_Rule):
    """Answers containing any term of the institution's list get -1, others 0."""

    path: str = Field(..., description="Text file of banned terms, one per line (`#` starts a comment); Latin words "
                                       "match whole words, any case; other terms match anywhere.", json_schema_extra={"is_path": True})
    weight: float = Field(1.0, ge=0, description="Weight of this rule in the reward.")


class RuleRewards(_Rule):
    """Rule-based rewards added to the reward model's dimensions (each optional)."""

    length: LengthRule | None = Field(None, description="Keep answers within a length range.")
    format: FormatRule | None = Field(None, description="Reward answers that contain a required pattern.")
    banned_terms: BannedTermsRule | None = Field(None, description="Penalise answers that use a banned term.")

    def given(self) -> list[str]:
        """The names of the rules that are set."""
        return [name for name in ("length", "format", "banned_terms") if getattr(self, name) is not None]


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
    parts = [rf"\b{re.escape(t)}\b" if re.fullmatch(r"[A-Za-z0-9' -]+", t) else re.escape(t)
             for t in sorted(set(terms), key=len, reverse=True)]
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
