"""Implicit-bias probes of a suite file: associations, relative decisions, and BBQ/CBBQ-style multiple choice.

They sit beside the alignment suite's explicit `bias:` probes (one prompt per group, reply scores compared)
in the same suite file and share its `axis` names (gender, ethnicity, religion, region, ...):

- `associations:` (IAT-style) — neutral sentence templates with a `{group}` and an `{attribute}` slot;
  `groups: {a: [...], b: [...]}` and `attributes: {a: [...], b: [...]}`. A positive effect means the model
  finds group a with attributes a (and b with b) likelier than the swapped pairing.
- `decisions:` — a scenario, a question and two or more candidates that differ only in group; the model
  picks a letter, asked once per rotation of the candidates so each one stands in every position.
- `choices:` / `choices_from:` — BBQ/CBBQ items: an ambiguous `context` whose right answer is the
  `unknown` option, optionally a `disambiguation` sentence after which `answer` is right; `biased` is
  the stereotype-consistent option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LETTERS = "ABCDEFGH"  # option letters of decisions and choices


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TermSets(_Strict):
    """Two sets of words: `a` and `b`."""

    a: list[str] = Field(..., min_length=1, description="The first set.")
    b: list[str] = Field(..., min_length=1, description="The second set.")

    @model_validator(mode="after")
    def _distinct(self) -> TermSets:
        terms = [t for t in (*self.a, *self.b)]
        if any(not t.strip() for t in terms):
            raise ValueError("a term is empty; give each term as a word or phrase")
        twice = sorted({t for t in terms if terms.count(t) > 1})
        if twice:
            raise ValueError(f"a term may appear once across a and b; repeated: {', '.join(twice)}")
        return self


class AssociationProbe(_Strict):
    """IAT-style: how much likelier the model finds group a with attributes a than with attributes b, against group b."""

    id: str
    axis: str = Field(..., description="What differs: gender, ethnicity, region, religion, ...")
    templates: list[str] = Field(
        ...,
        min_length=1,
        description="Neutral sentences with `{attribute}` once and `{group}` once (or `{group}` once in `prompt`).",
    )
    groups: TermSets = Field(..., description="Group terms: `a` (the group a stereotype is about) and `b`.")
    attributes: TermSets = Field(..., description="Attribute words: `a` (the stereotype's) and `b` (the opposite).")
    prompt: str | None = Field(
        None,
        description="The user message the sentences answer (default: 'Write one sentence.' in the templates' "
        'language); it may hold the `{group}` slot instead of the templates ("Describe the {group} guide.").',
    )
    language: Literal["zh", "en"] | None = Field(None, description="zh or en (default: from the templates' script).")

    @model_validator(mode="after")
    def _slots(self) -> AssociationProbe:
        in_prompt = (self.prompt or "").count("{group}")
        if in_prompt > 1:
            raise ValueError("`prompt` may contain `{group}` at most once")
        for template in self.templates:
            if template.count("{attribute}") != 1 or template.count("{group}") + in_prompt != 1:
                where = "the template" if not in_prompt else "the template (the prompt already has `{group}`)"
                raise ValueError(
                    f"{template!r} must contain `{{attribute}}` exactly once, and `{{group}}` exactly once in "
                    f"{where} or the prompt"
                )
        return self

    def sentence(self, template: str, group: str, attribute: str) -> str:
        """A template filled with one group term and one attribute word."""
        return template.replace("{group}", group).replace("{attribute}", attribute)


class DecisionProbe(_Strict):
    """Candidates that differ only in group: which one does the model pick (every order, so position cancels)?"""

    id: str
    axis: str = Field(..., description="What differs: gender, ethnicity, region, religion, ...")
    scenario: str = Field(..., min_length=1, description="The situation, identical for every candidate.")
    question: str = Field(..., min_length=1, description="What the model decides (it answers with a letter).")
    candidates: list[str] = Field(
        ..., description="Two or more candidates that differ only in the group term (at most 8)."
    )

    @field_validator("candidates")
    @classmethod
    def _at_least_two(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError(
                f"a decision needs at least two candidates that differ only in group (got {len(value)}); "
                "add the other group's candidate"
            )
        if len(value) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} candidates")
        if len(set(value)) != len(value):
            raise ValueError("candidates must be distinct")
        return value


class ChoiceOptions(_Strict):
    """What a `choices_from` file's items share."""

    axis: str | None = Field(None, description="The axis of every item that names none.")


class ChoiceProbe(_Strict):
    """A BBQ/CBBQ item: ambiguous context (right answer: unknown), optionally disambiguated (right answer: `answer`)."""

    id: str
    axis: str = Field(..., description="What differs: gender, ethnicity, region, religion, ...")
    context: str = Field(..., min_length=1, description="The ambiguous context: it does not say who.")
    disambiguation: str | None = Field(
        None, description="A sentence added after the context that settles the question (makes `answer` right)."
    )
    question: str = Field(..., min_length=1)
    options: list[str] = Field(..., description="The options: two people and an 'unknown' option (2 to 8).")
    unknown: int = Field(..., ge=0, description="Index of the 'cannot be determined' option.")
    biased: int = Field(..., ge=0, description="Index of the stereotype-consistent option.")
    answer: int | None = Field(None, ge=0, description="Index of the right option once disambiguated.")

    @model_validator(mode="after")
    def _indices(self) -> ChoiceProbe:
        if len(self.options) < 2:
            raise ValueError(
                f"a multiple-choice item needs at least two options (got {len(self.options)}): "
                "the people and an 'unknown' option"
            )
        if len(self.options) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} options")
        for key in ("unknown", "biased", "answer"):
            index = getattr(self, key)
            if index is not None and index >= len(self.options):
                raise ValueError(f"{key} is {index}, but there are {len(self.options)} options (indices from 0)")
        if self.biased == self.unknown:
            raise ValueError("`biased` names the 'unknown' option; it must name the stereotype-consistent person")
        if (self.disambiguation is None) != (self.answer is None):
            raise ValueError("give `disambiguation` and `answer` together (or neither)")
        if self.answer is not None and self.answer == self.unknown:
            raise ValueError("`answer` is the right option once disambiguated, so it cannot be the 'unknown' option")
        return self


class ChoiceFile(ChoiceOptions):
    """Multiple-choice items from a JSONL file (one item a line, the keys of `choices:`), e.g. converted CBBQ."""

    path: str = Field(..., description="JSONL file, relative to the suite file.")
    limit: int | None = Field(None, gt=0, description="Use only the first N items.")
